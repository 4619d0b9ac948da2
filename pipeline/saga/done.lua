-- Record one step's compensation outcome (once), and move the saga on.
-- A stage is over when each of its steps is done or dead; the saga then moves to
-- the next stage that still owes something, and after the last one ends the run
-- compensated, or cancelled when a person cancelled it (compensation_failed either
-- way if any step of the plan went dead). Called
-- with no step, it only moves on: it returns the current stage's steps that no
-- compensation has claimed yet (the ones to dispatch), or finishes the run.
-- KEYS[1..7] = the run's keys: states, steps, run, log, deliveries, saga, undo
-- ARGV[1] = step key, or '' to only move on
-- ARGV[2] = 'done' or 'dead'
-- ARGV[3] = agent (for the log)
-- ARGV[4] = detail (error for 'dead', '' otherwise)
-- ARGV[5] = retention of a finished run, seconds
-- Returns {'dup'}, {'wait'}, {'next', step, ...}, {'finished', status} or {'idle', status}.
local status = redis.call('HGET', KEYS[3], 'status')
if status ~= 'compensating' then return {'idle', status or ''} end
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local function ended(step)
  local state = redis.call('HGET', KEYS[6], 'c:' .. step)
  return state == 'done' or state == 'dead'
end
if ARGV[1] ~= '' then
  if ended(ARGV[1]) then return {'dup'} end
  redis.call('HSET', KEYS[6], 'c:' .. ARGV[1], ARGV[2])
  redis.call('XADD', KEYS[4], '*', 'event', 'compensation.' .. ARGV[2], 'at', now,
    'step', ARGV[1], 'agent', ARGV[3], 'error', ARGV[4])
end
local plan = cjson.decode(redis.call('HGET', KEYS[6], 'plan') or '[]')
local stage = tonumber(redis.call('HGET', KEYS[6], 'stage') or '0')
while stage < #plan do
  local open, unclaimed = false, {}
  for _, step in ipairs(plan[stage + 1]) do
    if not ended(step) then
      open = true
      local state = redis.call('HGET', KEYS[6], 'c:' .. step)
      -- not claimed by a compensation task yet ('self': the step undid itself,
      -- a task still has to record it)
      if not state or state == 'self' then unclaimed[#unclaimed + 1] = step end
    end
  end
  if open then
    redis.call('HSET', KEYS[6], 'stage', tostring(stage))
    if #unclaimed > 0 then return {'next', unpack(unclaimed)} end
    return {'wait'}
  end
  stage = stage + 1
end
redis.call('HSET', KEYS[6], 'stage', tostring(stage))
local final = redis.call('HGET', KEYS[6], 'cancelled') == '1' and 'cancelled' or 'compensated'
for _, steps in ipairs(plan) do
  for _, step in ipairs(steps) do
    if redis.call('HGET', KEYS[6], 'c:' .. step) == 'dead' then final = 'compensation_failed' end
  end
end
redis.call('HSET', KEYS[3], 'status', final, 'finished_at', now, 'updated_at', now)
redis.call('XADD', KEYS[4], '*', 'event', 'run.' .. final, 'at', now)
if final ~= 'compensation_failed' then
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
end
return {'finished', final}
