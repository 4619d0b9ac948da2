-- Force an agent's breaker open (until reset) or reset it to closed, by hand (a reset
-- clears its counters too).
-- KEYS[1] = pipeline:breaker:{agent}         (hash: state, counters, opened_at, last transition)
-- KEYS[2] = pipeline:breaker:{agent}:log     (stream: the breaker's transitions)
-- KEYS[3] = pipeline:breaker:{agent}:probes  (zset: probe lease id -> lease expiry, ms)
-- ARGV[1] = agent name (for the log)
-- ARGV[2] = 'open' or 'closed'
-- ARGV[3] = reason (for the log)
-- ARGV[4] = most transitions kept in the log
-- Returns {from, to}.
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local from = redis.call('HGET', KEYS[1], 'state') or 'closed'
local to = ARGV[2]
redis.call('DEL', KEYS[3])
if to == 'open' then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'forced', '1')
else
  redis.call('HSET', KEYS[1], 'state', 'closed', 'consecutive', '0', 'calls', '', 'forced', '0')
  redis.call('HDEL', KEYS[1], 'successes', 'failures', 'rejected', 'opened_at')
end
redis.call('HSET', KEYS[1], 'last_from', from, 'last_to', to, 'last_reason', ARGV[3],
  'last_at', now)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'at', now, 'agent', ARGV[1],
  'from', from, 'to', to, 'reason', ARGV[3])
return {from, to}
