-- Record the compensation plan (stages of step keys, newest stage first) and
-- return the steps of the current stage still owed. Called again (a redelivered
-- or re-driven compensate_run), it keeps the plan unless told to replace it.
-- KEYS[1] = pipeline:{run}:run   (hash: the run's record)
-- KEYS[2] = pipeline:{run}:log   (stream: what happened)
-- KEYS[3] = pipeline:{run}:saga  (hash: plan, stage, pending, c:<step> -> done|dead)
-- ARGV[1] = the plan, JSON: [[step, ...], ...]
-- ARGV[2] = '1' to replace an existing plan (re-drive), else '0'
-- Returns {'stage', index, step, ...} or {'empty'} when there is nothing to compensate.
if ARGV[2] == '1' or not redis.call('HGET', KEYS[3], 'plan') then
  local plan = cjson.decode(ARGV[1])
  if #plan == 0 then return {'empty'} end
  redis.call('HSET', KEYS[3], 'plan', ARGV[1], 'stage', '0', 'pending', tostring(#plan[1]),
    'dead', '0')
  local t = redis.call('TIME')
  redis.call('XADD', KEYS[2], '*', 'event', 'compensation.planned',
    'at', tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)),
    'plan', ARGV[1])
end
local plan = cjson.decode(redis.call('HGET', KEYS[3], 'plan'))
local stage = tonumber(redis.call('HGET', KEYS[3], 'stage'))
if stage >= #plan then return {'empty'} end
local out = {'stage', tostring(stage)}
for _, step in ipairs(plan[stage + 1]) do
  local state = redis.call('HGET', KEYS[3], 'c:' .. step)
  if state ~= 'done' and state ~= 'dead' then out[#out + 1] = step end
end
return out
