-- A step its limits refused: it was not run. Give its delivery back (a refusal is no
-- attempt: it must not count toward the step's most deliveries), count the time it
-- waits, and log it: one `step.throttled` row per refusal.
-- KEYS = the run's keys (RunKeys.all): states, steps, run, log, deliveries, ...
-- ARGV[1] = step key
-- ARGV[2] = agent name
-- ARGV[3] = the wait the limit asked for, ms
-- ARGV[4] = the limit's name
-- ARGV[5] = what it waits on: requests, tokens or concurrency
-- ARGV[6] = the attempt (the delivery count the open gave it)
-- ARGV[7] = worker host name
-- ARGV[8] = Celery task id
-- ARGV[9] = ms the step waits for it before it is tried again (the limit's wait, or as much
--           of it as one message may wait)
-- Returns the ms this step has waited in all, this refusal's included (0 when the run is
-- gone).
--
-- The run's record keeps `throttled_ms` (the run's total, for `inspect`) and
-- `throttled:<step>` (the step's, for the agent's limit_wait_max_s): the time waited.
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
if tonumber(redis.call('HGET', KEYS[5], ARGV[1]) or '0') > 0 then
  redis.call('HINCRBY', KEYS[5], ARGV[1], -1)
end
redis.call('HINCRBY', KEYS[3], 'throttled_ms', ARGV[9])
local total = redis.call('HINCRBY', KEYS[3], 'throttled:' .. ARGV[1], ARGV[9])
redis.call('XADD', KEYS[4], '*', 'event', 'step.throttled', 'at', now, 'step', ARGV[1],
  'agent', ARGV[2], 'attempt', ARGV[6], 'limit', ARGV[4], 'reason', ARGV[5],
  'wait_ms', ARGV[3], 'countdown_ms', ARGV[9], 'worker', ARGV[7], 'task_id', ARGV[8])
return total
