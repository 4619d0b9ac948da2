-- Re-drive a run whose compensation failed: forget the dead compensations so they
-- are owed again, and mark the run compensating.
-- KEYS[1] = pipeline:{run}:run   (hash: the run's record)
-- KEYS[2] = pipeline:{run}:log   (stream: what happened)
-- KEYS[3] = pipeline:{run}:saga  (hash: plan, stage, pending, c:<step> -> done|dead)
-- Returns {'ok'} or {'not_failed', status}.
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'compensation_failed' then return {'not_failed', status or ''} end
local fields = redis.call('HGETALL', KEYS[3])
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 2) == 'c:' and fields[i + 1] == 'dead' then
    redis.call('HDEL', KEYS[3], fields[i])
  end
end
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[1], 'status', 'compensating', 'updated_at', now)
redis.call('HDEL', KEYS[1], 'finished_at')
redis.call('XADD', KEYS[2], '*', 'event', 'run.compensating', 'at', now,
  'reason', 're-driven by hand')
return {'ok'}
