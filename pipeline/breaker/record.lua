-- Record the outcome of a call the breaker admitted, and move the breaker if it must.
-- KEYS[1] = pipeline:breaker:{agent}         (hash: state, counters, opened_at, last transition)
-- KEYS[2] = pipeline:breaker:{agent}:log     (stream: the breaker's transitions)
-- KEYS[3] = pipeline:breaker:{agent}:probes  (zset: probe lease id -> lease expiry, ms)
-- ARGV[1] = agent name (for the log)
-- ARGV[2] = outcome: 'success', 'failure' or 'ignore' (the call proved nothing either way)
-- ARGV[3] = lease id of the call ('' when it was admitted while closed)
-- ARGV[4] = consecutive failures that open the breaker
-- ARGV[5] = size of the sliding window of recent calls
-- ARGV[6] = calls the window needs before its failure rate counts
-- ARGV[7] = failure rate (0..1) above which the breaker opens
-- ARGV[8] = reason given with a failure (for the log)
-- ARGV[9] = most transitions kept in the log
-- Returns {state, transition, seq}: transition is '' or 'from>to'; seq numbers the
-- breaker's recorded outcomes, in the order Redis applied them.
local function server_now()
  local t = redis.call('TIME')
  return tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
local outcome = ARGV[2]
local h = redis.call('HMGET', KEYS[1], 'state', 'consecutive', 'calls')
local state = h[1] or 'closed'
local seq = tostring(redis.call('HINCRBY', KEYS[1], 'seq', 1))

local function move(to, reason)
  local now = server_now()
  if to == 'open' then redis.call('HSET', KEYS[1], 'opened_at', now) end
  redis.call('HSET', KEYS[1], 'state', to, 'last_from', state, 'last_to', to,
    'last_reason', reason, 'last_at', now)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[9], '*', 'at', now, 'agent', ARGV[1],
    'from', state, 'to', to, 'reason', reason)
  local transition = state .. '>' .. to
  state = to
  return transition
end

if outcome == 'success' then redis.call('HINCRBY', KEYS[1], 'successes', 1)
elseif outcome == 'failure' then redis.call('HINCRBY', KEYS[1], 'failures', 1) end

if ARGV[3] ~= '' then
  local held = redis.call('ZREM', KEYS[3], ARGV[3])
  if state ~= 'half_open' or outcome == 'ignore' or held == 0 then
    return {state, '', seq}  -- a probe that proved nothing, or whose lease ran out
  end
  redis.call('DEL', KEYS[3])
  if outcome == 'success' then
    redis.call('HSET', KEYS[1], 'consecutive', '0', 'calls', '')
    return {'closed', move('closed', 'probe succeeded'), seq}
  end
  return {'open', move('open', 'probe failed: ' .. ARGV[8]), seq}
end

if state ~= 'closed' or outcome == 'ignore' then
  return {state, '', seq}  -- a call admitted before the breaker opened: counted, not judged
end
local bit = outcome == 'failure' and '1' or '0'
local calls = string.sub((h[3] or '') .. bit, -tonumber(ARGV[5]))
local consecutive = outcome == 'failure' and tonumber(h[2] or '0') + 1 or 0
redis.call('HSET', KEYS[1], 'consecutive', tostring(consecutive), 'calls', calls)
if consecutive >= tonumber(ARGV[4]) then
  return {'open', move('open', consecutive .. ' consecutive failures, last: ' .. ARGV[8]), seq}
end
local n = string.len(calls)
if n >= tonumber(ARGV[6]) then
  local _, failed = string.gsub(calls, '1', '')
  if failed / n > tonumber(ARGV[7]) then
    return {'open', move('open', string.format('failure rate %d/%d over the last %d calls',
      failed, n, n)), seq}
  end
end
return {'closed', '', seq}
