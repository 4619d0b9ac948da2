-- Choreography: end an event delivery and publish what it emits, in one atomic step.
-- Queued right after seal.lua in the step's seal round trip (and run alone to publish a
-- run's starting event, to record a failed delivery, or to finish a handover again).
-- KEYS[1..9] = the run's keys: states, steps, run, log, deliveries, saga, undo, ledger, events
-- ARGV[1] = the delivery this call ends ('<event>:<agent>'), or '' (a start)
-- ARGV[2] = how it ended: 'handled' (its step is sealed) or 'failed'; '' with no delivery
-- ARGV[3] = the task that ended it (ledger: handled:<task> / failed:<task>)
-- ARGV[4] = what publishes: a delivery key, '<delivery>#failed', or 'start' (one event per
--           publisher, ever: publishing again returns the first event)
-- ARGV[5] = type of the event to publish, or '' to publish nothing
-- ARGV[6] = publisher (agent name, or 'client')
-- ARGV[7] = the event that caused this one ('' for a start)
-- ARGV[8] = version the event carries; '' for the delivery's sealed version (handled),
--           or the causing event's version (failed)
-- ARGV[9] = the run's terminal event types, comma-separated: given with its starting
--           event and kept in the run's record ('' afterwards: the record says)
-- ARGV[10] = '1' for a failure event: recorded, never routed; it begins the saga
-- ARGV[11] = retention of a finished run, seconds
-- ARGV[12..] = the subscribers of the event (agent names), as routed by the publisher;
--              for a failure event, ARGV[12] is why the delivery failed (the saga's reason)
-- The saga begins here, atomically with what ends the run's progress (a failure event, or
-- nothing outstanding and no terminal event), exactly as saga/begin.lua does: no sibling
-- can end the run 'succeeded' in between. The caller then enqueues the saga's planner.
-- Returns one of:
--   {'missing'}                        no such run
--   {'unsealed'}                       'handled' for a step that is not sealed: nothing done
--   {'published', id, type, version, sub...}  a new event, and the deliveries to dispatch
--   {'again', id, type, version, sub...}      published before: deliveries not picked up
--   {'succeeded', version}             a terminal event was published, nothing is outstanding
--   {'compensating', reason}           this call began the saga (a failure, or a stall)
--   {'done', status}                   nothing to publish, or the run is not live
local status = redis.call('HGET', KEYS[3], 'status')
if not status then return {'missing'} end
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local live = status == 'running' or status == 'waiting_for_human'
local delivery, failure = ARGV[1], ARGV[10] == '1'
if ARGV[9] ~= '' then redis.call('HSET', KEYS[3], 'terminal_types', ARGV[9]) end
local terminal = false
for tt in string.gmatch(redis.call('HGET', KEYS[3], 'terminal_types') or '', '[^,]+') do
  if tt == ARGV[5] then terminal = true end
end

local function keep_with_run()  -- the ledger and events expire with the run, or never
  local ttl = redis.call('PTTL', KEYS[3])
  for i = 8, 9 do
    if ttl > 0 then redis.call('PEXPIRE', KEYS[i], ttl) else redis.call('PERSIST', KEYS[i]) end
  end
end

local function begin_saga(reason, agent)  -- as saga/begin.lua
  if redis.call('HSETNX', KEYS[6], 'started', '1') == 0 then return false end
  redis.call('HSET', KEYS[3], 'status', 'compensating', 'error', reason, 'failed_agent', agent,
    'updated_at', now)
  release_budget(KEYS[3])
  redis.call('HSET', KEYS[6], 'reason', reason, 'started_at', now)
  redis.call('XADD', KEYS[4], '*', 'event', 'run.compensating', 'at', now, 'reason', reason,
    'agent', agent)
  return true
end

-- 1. End the delivery, once (only one that was published: dispatched, or claimed).
if delivery ~= '' then
  local state = redis.call('HGET', KEYS[8], delivery) or ''
  local kind = string.match(state, '^[a-z]+') or ''
  if kind == 'dispatched' or kind == 'running' then
    local version = redis.call('HGET', KEYS[2], delivery)
    if ARGV[2] == 'handled' and not version then return {'unsealed'} end
    redis.call('HSET', KEYS[8], delivery, ARGV[2] .. ':' .. ARGV[3])
    redis.call('HINCRBY', KEYS[3], 'outstanding', -1)
    redis.call('XADD', KEYS[4], '*', 'event', 'delivery.' .. ARGV[2], 'at', now,
      'step', delivery, 'agent', ARGV[6], 'cause', ARGV[7], 'version', version or '')
  end
end

-- 2. Publish, once per publisher.
local published = nil
if ARGV[5] ~= '' then
  local id = redis.call('HGET', KEYS[9], 'src:' .. ARGV[4])
  if id then
    local event = cjson.decode(redis.call('HGET', KEYS[9], id))
    published = {'again', id, event.type, tostring(event.version)}
    if live then
      for _, sub in ipairs(event.subscribers) do
        if redis.call('HGET', KEYS[8], id .. ':' .. sub) == 'dispatched' then
          published[#published + 1] = sub
        end
      end
    end
  elseif live or failure then
    local version = ARGV[8]
    if version == '' then
      if failure then
        local cause = redis.call('HGET', KEYS[9], ARGV[7])
        version = cause and tostring(cjson.decode(cause).version) or ''
      else
        version = redis.call('HGET', KEYS[2], delivery) or ''
      end
    end
    id = 'e' .. redis.call('HINCRBY', KEYS[3], 'events', 1)
    local subs = {}
    if not failure then
      for i = 12, #ARGV do subs[#subs + 1] = ARGV[i] end
    end
    local event = {id = id, type = ARGV[5], cause = ARGV[7], version = tonumber(version) or -1,
      publisher = ARGV[6], at = tonumber(now), subscribers = subs, failure = failure,
      terminal = terminal}
    redis.call('HSET', KEYS[9], 'src:' .. ARGV[4], id, id, cjson.encode(event))
    redis.call('XADD', KEYS[4], '*', 'event', 'event.published', 'at', now, 'event_id', id,
      'type', ARGV[5], 'cause', ARGV[7], 'version', version, 'publisher', ARGV[6],
      'subscribers', table.concat(subs, ','), 'terminal', terminal and '1' or '0',
      'failure', ARGV[10])
    if #subs == 0 and not failure and not terminal then
      redis.call('XADD', KEYS[4], '*', 'event', 'event.unrouted', 'at', now, 'event_id', id,
        'type', ARGV[5], 'publisher', ARGV[6])
      local unrouted = redis.call('HGET', KEYS[3], 'unrouted')
      redis.call('HSET', KEYS[3], 'unrouted',
        (unrouted and unrouted .. ', ' or '') .. ARGV[5] .. ' (' .. id .. ')')
    end
    for _, sub in ipairs(subs) do
      redis.call('HSET', KEYS[8], id .. ':' .. sub, 'dispatched')
    end
    redis.call('HINCRBY', KEYS[3], 'outstanding', #subs)
    if terminal and not redis.call('HGET', KEYS[3], 'terminal_event') then
      redis.call('HSET', KEYS[3], 'terminal_event', id, 'output_version', version)
    end
    published = {'published', id, ARGV[5], version}
    for _, sub in ipairs(subs) do published[#published + 1] = sub end
  end
end
keep_with_run()

-- 3. A failure ends the run's progress: the saga takes over.
if failure then
  if live then
    local reason = ARGV[5] .. ' (' .. (published and published[2] or '?') .. '): ' ..
      (ARGV[12] or '')
    if begin_saga(string.sub(reason, 1, 2000), ARGV[6]) then
      return {'compensating', reason}
    end
  end
  return {'done', redis.call('HGET', KEYS[3], 'status')}
end

-- 4. The run ends when nothing is outstanding: succeeded after a terminal event, else
-- stalled (compensated). A run waiting for a person ends too once nothing is outstanding.
if live then
  local outstanding = tonumber(redis.call('HGET', KEYS[3], 'outstanding') or '0')
  if outstanding <= 0 then
    local output = redis.call('HGET', KEYS[3], 'output_version')
    if redis.call('HGET', KEYS[3], 'terminal_event') and output then
      redis.call('HSET', KEYS[3], 'status', 'succeeded', 'finished_at', now, 'updated_at', now)
      redis.call('XADD', KEYS[4], '*', 'event', 'run.succeeded', 'at', now, 'version', output)
      for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[11]) end
      return {'succeeded', output}
    end
    local unrouted = redis.call('HGET', KEYS[3], 'unrouted')
    local reason = 'choreography stalled: no delivery is outstanding and no terminal event (' ..
      (redis.call('HGET', KEYS[3], 'terminal_types') or '') .. ') was published' ..
      (unrouted and ('; unrouted: ' .. unrouted) or '')
    if begin_saga(string.sub(reason, 1, 2000), '') then return {'compensating', reason} end
  end
end
if published then return published end
return {'done', status}
