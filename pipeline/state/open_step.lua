-- Open a step: the first of the step's two round trips.
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
-- KEYS[6..7] = saga, undo (unused here)
-- KEYS[8] = pipeline:{run}:ledger      (hash delivery key -> state; choreography only)
-- ARGV[6] = '' for a workflow step; for an event delivery (choreography), the task id
--           that claims it: one task handles a delivery, any other is a duplicate
-- ARGV[7] = the queue the step was delivered on (for the trace)
-- ARGV[8], ARGV[9] = tokens and cost the step reserves of its run's budget (its estimate)
-- ARGV[10], ARGV[11] = the agent's prices per 1,000 prompt and completion tokens (for the
--           seal, which charges what the step used)
-- ARGV[12..] = input version numbers
-- Returns one of:
--   {'sealed', version, own}         the step was sealed already: do nothing (own is '1'
--                                    when this task sealed it: its handover may not be done)
--   {'duplicate', state}             another task holds or ended this delivery: do nothing
--   {'unknown'}                      no such delivery was ever published
--   {'missing'}                      no such run (never created, or expired)
--   {'aborted', status}              the run is not running any more
--   {'exhausted', deliveries}        delivered too often: a crash loop
--   {'noversion', version}           an input version does not exist
--   {'over_budget', kind, budget, spent, reserved, estimate}  the step's estimate would
--                                    cross the run's budget (kind: tokens or cost): not run
--   {'open', deliveries, at_ms, fields1, fields2, ...}  the input versions' entries
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local claim = ARGV[6]
local function duplicate(state)
  redis.call('XADD', KEYS[4], '*', 'event', 'delivery.duplicate', 'at', now, 'step', ARGV[1],
    'agent', ARGV[2], 'worker', ARGV[4], 'task_id', ARGV[5], 'state', state or '')
end
local sealed = redis.call('HGET', KEYS[2], ARGV[1])
if sealed then
  if claim == '' then return {'sealed', sealed, '0'} end
  if redis.call('EXISTS', KEYS[3]) == 0 then return {'sealed', sealed, '0'} end
  local state = redis.call('HGET', KEYS[8], ARGV[1]) or ''
  duplicate(state)
  -- this task handled it, or sealed it and lost the rest (its worker died, or the reply of
  -- the seal round trip): the caller finishes the handover (idempotent)
  local own = state == 'handled:' .. claim or state == 'running:' .. claim
  return {'sealed', sealed, own and '1' or '0'}
end
-- the status and the budget in one read: b[1..7] the budget, b[8] the status
local b = redis.call('HMGET', KEYS[3], 'budget_tokens', 'budget_cost', 'spent_tokens',
  'spent_cost', 'reserved_tokens', 'reserved_cost', 'reserve:' .. ARGV[1], 'status')
local status = b[8]
if not status then return {'missing'} end
if status ~= 'running' and status ~= 'waiting_for_human' then return {'aborted', status} end
if claim ~= '' then
  local state = redis.call('HGET', KEYS[8], ARGV[1])
  if not state then return {'unknown'} end
  if state ~= 'dispatched' and state ~= 'running:' .. claim then
    duplicate(state)
    return {'duplicate', state}
  end
  redis.call('HSET', KEYS[8], ARGV[1], 'running:' .. claim)
end
-- the budget: a step reserves its estimate once per step key (a redelivery, a retry or a
-- throttled step finds its reservation), and does not run if it would cross the budget
if (b[1] or b[2]) and not b[7] then
  local want = {tonumber(ARGV[8]), tonumber(ARGV[9])}
  for i, kind in ipairs({'tokens', 'cost'}) do
    if b[i] then
      local spent, held = tonumber(b[2 + i] or '0'), tonumber(b[4 + i] or '0')
      if spent + held + want[i] > tonumber(b[i]) then
        redis.call('XADD', KEYS[4], '*', 'event', 'budget.exceeded', 'at', now, 'step',
          ARGV[1], 'agent', ARGV[2], 'budget', kind, 'limit', b[i], 'spent', tostring(spent),
          'reserved', tostring(held), 'estimate', ARGV[7 + i])
        return {'over_budget', kind, b[i], tostring(spent), tostring(held), ARGV[7 + i]}
      end
    end
  end
  redis.call('HSET', KEYS[3], 'reserve:' .. ARGV[1],
    ARGV[8] .. '|' .. ARGV[9] .. '|' .. ARGV[10] .. '|' .. ARGV[11])
  redis.call('HINCRBYFLOAT', KEYS[3], 'reserved_tokens', ARGV[8])
  redis.call('HINCRBYFLOAT', KEYS[3], 'reserved_cost', ARGV[9])
end
local n = redis.call('HINCRBY', KEYS[5], ARGV[1], 1)
if n > tonumber(ARGV[3]) then
  redis.call('XADD', KEYS[4], '*', 'event', 'step.exhausted', 'at', now, 'step', ARGV[1],
    'agent', ARGV[2], 'attempt', tostring(n), 'worker', ARGV[4], 'task_id', ARGV[5])
  return {'exhausted', tostring(n)}
end
local out = {'open', tostring(n), now}
for i = 12, #ARGV do
  local id = ARGV[i] .. '-1'
  local e = redis.call('XRANGE', KEYS[1], id, id)
  if #e == 0 then return {'noversion', ARGV[i]} end
  out[#out + 1] = e[1][2]
end
redis.call('XADD', KEYS[4], '*', 'event', 'step.started', 'at', now, 'step', ARGV[1],
  'agent', ARGV[2], 'attempt', tostring(n), 'worker', ARGV[4], 'task_id', ARGV[5],
  'queue', ARGV[7], 'inputs', table.concat(ARGV, ',', 12))
return out
