-- Open a step: the first of the step's two round trips (DESIGN section 5).
-- KEYS[1] = pipeline:{run}:states      (stream of sealed versions)
-- KEYS[2] = pipeline:{run}:steps       (hash step key -> version)
-- KEYS[3] = pipeline:{run}:run         (hash: the run's record)
-- KEYS[4] = pipeline:{run}:log         (stream: what happened)
-- KEYS[5] = pipeline:{run}:deliveries  (hash step key -> deliveries so far)
-- ARGV[1] = step key
-- ARGV[2] = agent name
-- ARGV[3] = most deliveries allowed for this step
-- ARGV[4] = worker host name (for the trace)
-- ARGV[5] = Celery task id (for the trace: a chord's error names its failed member by it)
-- ARGV[6..] = input version numbers
-- Returns one of:
--   {'sealed', version}              the step was sealed already: do nothing
--   {'missing'}                      no such run (never created, or expired)
--   {'aborted', status}              the run is not running any more
--   {'exhausted', deliveries}        delivered too often: a crash loop
--   {'noversion', version}           an input version does not exist
--   {'open', deliveries, at_ms, fields1, fields2, ...}  the input versions' entries
local sealed = redis.call('HGET', KEYS[2], ARGV[1])
if sealed then return {'sealed', sealed} end
local status = redis.call('HGET', KEYS[3], 'status')
if not status then return {'missing'} end
if status ~= 'running' and status ~= 'waiting_for_human' then return {'aborted', status} end
local n = redis.call('HINCRBY', KEYS[5], ARGV[1], 1)
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
if n > tonumber(ARGV[3]) then
  redis.call('XADD', KEYS[4], '*', 'event', 'step.exhausted', 'at', now, 'step', ARGV[1],
    'agent', ARGV[2], 'attempt', tostring(n), 'worker', ARGV[4], 'task_id', ARGV[5])
  return {'exhausted', tostring(n)}
end
local out = {'open', tostring(n), now}
for i = 6, #ARGV do
  local id = ARGV[i] .. '-1'
  local e = redis.call('XRANGE', KEYS[1], id, id)
  if #e == 0 then return {'noversion', ARGV[i]} end
  out[#out + 1] = e[1][2]
end
redis.call('XADD', KEYS[4], '*', 'event', 'step.started', 'at', now, 'step', ARGV[1],
  'agent', ARGV[2], 'attempt', tostring(n), 'worker', ARGV[4], 'task_id', ARGV[5],
  'inputs', table.concat(ARGV, ',', 6))
return out
