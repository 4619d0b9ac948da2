-- Ask an agent's breaker for permission to run one call.
-- KEYS[1] = pipeline:breaker:{agent}         (hash: state, counters, opened_at, last transition)
-- KEYS[2] = pipeline:breaker:{agent}:log     (stream: the breaker's transitions)
-- KEYS[3] = pipeline:breaker:{agent}:probes  (zset: probe lease id -> lease expiry, ms)
-- ARGV[1] = agent name (for the log)
-- ARGV[2] = reset timeout, ms (open -> half-open)
-- ARGV[3] = probes admitted at once while half-open
-- ARGV[4] = probe lease, ms (a probe whose worker died frees its slot after this)
-- ARGV[5] = lease id of this call
-- ARGV[6] = most transitions kept in the log
-- Returns {decision, state, wait_ms, transition}: decision is 'allow' (closed), 'probe'
-- (half-open, a lease was taken) or 'deny'; wait_ms is how long until a call may be
-- admitted; transition is '' or 'open>half_open' when this call moved the breaker.
local h = redis.call('HMGET', KEYS[1], 'state', 'opened_at', 'forced')
local state = h[1] or 'closed'
if state == 'closed' then return {'allow', 'closed', '0', ''} end  -- the hot path: one read
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local transition = ''
if state == 'open' then
  local waited = now - tonumber(h[2] or '0')
  if h[3] == '1' or waited < tonumber(ARGV[2]) then
    redis.call('HINCRBY', KEYS[1], 'rejected', 1)
    local wait = h[3] == '1' and -1 or (tonumber(ARGV[2]) - waited)
    return {'deny', 'open', tostring(wait), ''}
  end
  state = 'half_open'
  redis.call('HSET', KEYS[1], 'state', state, 'last_from', 'open', 'last_to', state,
    'last_reason', 'reset timeout elapsed', 'last_at', tostring(now))
  redis.call('DEL', KEYS[3])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'at', tostring(now), 'agent', ARGV[1],
    'from', 'open', 'to', state, 'reason', 'reset timeout elapsed')
  transition = 'open>half_open'
end
-- half-open: admit a probe while fewer than the allowed number hold a live lease; a
-- probe delivered again (its worker died) keeps the lease it holds
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', tostring(now))
if redis.call('ZSCORE', KEYS[3], ARGV[5])
    or redis.call('ZCARD', KEYS[3]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[3], tostring(now + tonumber(ARGV[4])), ARGV[5])
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[4]) * 2)
  return {'probe', state, '0', transition}
end
redis.call('HINCRBY', KEYS[1], 'rejected', 1)
local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
return {'deny', state, tostring(math.max(0, tonumber(first[2]) - now)), transition}
