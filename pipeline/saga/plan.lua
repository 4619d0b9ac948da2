-- Record the compensation plan: stages of step keys, newest stage first. Kept
-- when called again (a redelivered compensate_run) unless told to replace it
-- (a re-drive, which plans only what is still owed). done.lua then moves on.
-- KEYS[1] = pipeline:{run}:run   (hash: the run's record)
-- KEYS[2] = pipeline:{run}:log   (stream: what happened)
-- KEYS[3] = pipeline:{run}:saga  (hash: plan, stage, c:<step> -> claimed|self|done|dead)
-- ARGV[1] = the plan, JSON: [[step, ...], ...]
-- ARGV[2] = '1' to replace an existing plan (re-drive), else '0'
-- Returns {'planned'}, {'kept'}, or {'not_compensating', status}.
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'compensating' then return {'not_compensating', status or ''} end
if ARGV[2] ~= '1' and redis.call('HGET', KEYS[3], 'plan') then return {'kept'} end
redis.call('HSET', KEYS[3], 'plan', ARGV[1], 'stage', '0')
local t = redis.call('TIME')
redis.call('XADD', KEYS[2], '*', 'event', 'compensation.planned',
  'at', tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)), 'plan', ARGV[1])
return {'planned'}
