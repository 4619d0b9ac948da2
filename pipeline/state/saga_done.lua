-- Record one step's compensation outcome, once, and move the saga on: when the
-- stage's last compensation is in, return the next stage's steps; after the last
-- stage, end the run compensated (or compensation_failed if any went dead).
-- KEYS[1..7] = the run's keys: states, steps, run, log, deliveries, saga, undo
-- ARGV[1] = step key
-- ARGV[2] = 'done' or 'dead'
-- ARGV[3] = agent (for the log)
-- ARGV[4] = detail (error for 'dead', '' otherwise)
-- ARGV[5] = retention of a finished run, seconds
-- Returns {'dup'}, {'wait'}, {'next', step, ...} or {'finished', status}.
local field = 'c:' .. ARGV[1]
local before = redis.call('HGET', KEYS[6], field)
if before == 'done' or before == 'dead' then return {'dup'} end
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[6], field, ARGV[2])
if ARGV[2] == 'dead' then redis.call('HINCRBY', KEYS[6], 'dead', 1) end
redis.call('XADD', KEYS[4], '*', 'event', 'compensation.' .. ARGV[2], 'at', now,
  'step', ARGV[1], 'agent', ARGV[3], 'error', ARGV[4])
if redis.call('HINCRBY', KEYS[6], 'pending', -1) > 0 then return {'wait'} end
local plan = cjson.decode(redis.call('HGET', KEYS[6], 'plan'))
local stage = redis.call('HINCRBY', KEYS[6], 'stage', 1)
while stage < #plan do
  local owed = {}
  for _, step in ipairs(plan[stage + 1]) do
    local state = redis.call('HGET', KEYS[6], 'c:' .. step)
    if state ~= 'done' and state ~= 'dead' then owed[#owed + 1] = step end
  end
  if #owed > 0 then
    redis.call('HSET', KEYS[6], 'pending', tostring(#owed))
    return {'next', unpack(owed)}
  end
  stage = redis.call('HINCRBY', KEYS[6], 'stage', 1)
end
local status = tonumber(redis.call('HGET', KEYS[6], 'dead')) > 0 and 'compensation_failed'
  or 'compensated'
redis.call('HSET', KEYS[3], 'status', status, 'finished_at', now, 'updated_at', now)
redis.call('XADD', KEYS[4], '*', 'event', 'run.' .. status, 'at', now)
if status == 'compensated' then
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
end
return {'finished', status}
