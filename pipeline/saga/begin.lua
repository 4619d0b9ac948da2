-- Start compensating a run, once: the guard of the saga. However many times
-- Celery calls the errback for one run, only the first call gets 'started'.
-- From then on no step can seal (seal.lua refuses a run that is not live).
-- KEYS[1] = pipeline:{run}:run   (hash: the run's record)
-- KEYS[2] = pipeline:{run}:log   (stream: what happened)
-- KEYS[3] = pipeline:{run}:saga  (hash: the compensation's state)
-- ARGV[1] = why (error text, or 'cancelled by hand')
-- ARGV[2] = agent to blame ('' when none)
-- ARGV[3] = '1' when a person cancelled the run (it then ends 'cancelled', not
--           'compensated'), '' otherwise
-- Returns {'started'}, {'already', status, planned} or {'missing'}; planned is '1' once
-- the planner recorded its plan (a saga begun elsewhere, say by emit.lua, and not planned
-- yet still needs its planner enqueued).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
local planned = redis.call('HEXISTS', KEYS[3], 'plan') == 1 and '1' or '0'
if status ~= 'running' and status ~= 'waiting_for_human' then
  return {'already', status, planned}
end
if redis.call('HSETNX', KEYS[3], 'started', '1') == 0 then return {'already', status, planned} end
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[1], 'status', 'compensating', 'error', ARGV[1], 'failed_agent', ARGV[2],
  'updated_at', now)
release_budget(KEYS[1])
redis.call('HSET', KEYS[3], 'reason', ARGV[1], 'started_at', now, 'cancelled', ARGV[3])
redis.call('XADD', KEYS[2], '*', 'event', 'run.compensating', 'at', now, 'reason', ARGV[1],
  'agent', ARGV[2], 'cancelled', ARGV[3])
return {'started'}
