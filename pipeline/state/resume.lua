-- Resume a run parked for a person: back to running. The parked steps' delivery
-- counts start again, so a run parked and resumed many times is not taken for a
-- crash loop.
-- KEYS[1] = pipeline:{run}:run         (hash: the run's record)
-- KEYS[2] = pipeline:{run}:log         (stream: what happened)
-- KEYS[3] = pipeline:{run}:deliveries  (hash step key -> deliveries so far)
-- ARGV[1] = how it resumes (for the log): 'rerun' or 'output'
-- Returns {'resumed', parked steps (comma-separated)} or {'not_parked', status or ''}.
local h = redis.call('HMGET', KEYS[1], 'status', 'parked_steps')
if h[1] ~= 'waiting_for_human' then return {'not_parked', h[1] or ''} end
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[1], 'status', 'running', 'updated_at', now)
redis.call('HDEL', KEYS[1], 'parked_steps')
for step in string.gmatch(h[2] or '', '[^,]+') do redis.call('HDEL', KEYS[3], step) end
redis.call('XADD', KEYS[2], '*', 'event', 'run.resumed', 'at', now, 'steps', h[2] or '',
  'how', ARGV[1])
return {'resumed', h[2] or ''}
