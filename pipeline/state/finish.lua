-- Move a run that has not ended (running, waiting for a person, compensating) to a
-- final status once, and start its retention.
-- KEYS[1] = pipeline:{run}:states      (stream of sealed versions)
-- KEYS[2] = pipeline:{run}:steps       (hash step key -> version)
-- KEYS[3] = pipeline:{run}:run         (hash: the run's record)
-- KEYS[4] = pipeline:{run}:log         (stream: what happened)
-- KEYS[5] = pipeline:{run}:deliveries  (hash step key -> deliveries so far)
-- KEYS[6..] = the run's other keys (saga, undo): given their retention with the rest
-- ARGV[1] = the new status
-- ARGV[2] = error text ('' when none)
-- ARGV[3] = agent whose failure ended the run ('' when none)
-- ARGV[4] = retention of a finished run, seconds
-- Returns {'changed', old_status}, {'unchanged', status} or {'missing'}.
local status = redis.call('HGET', KEYS[3], 'status')
if not status then return {'missing'} end
if status ~= 'running' and status ~= 'waiting_for_human' and status ~= 'compensating' then
  return {'unchanged', status}
end
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[3], 'status', ARGV[1], 'error', ARGV[2], 'failed_agent', ARGV[3],
  'finished_at', now, 'updated_at', now)
release_budget(KEYS[3])
redis.call('XADD', KEYS[4], '*', 'event', 'run.' .. ARGV[1], 'at', now, 'error', ARGV[2],
  'agent', ARGV[3])
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return {'changed', status}
