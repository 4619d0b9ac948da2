-- Admit one call under a named limit, or say how long to wait: one atomic step on the
-- limit's keys, on Redis server time, exact however many workers call at once.
-- KEYS[1] = pipeline:limit:{name}          (hash: requests, tokens = GCRA theoretical
--                                          arrival times, ms; the limit's definition as
--                                          last used; throttled, throttled_ms: refusals)
-- KEYS[2] = pipeline:limit:{name}:leases   (zset lease -> expiry, ms: calls in flight)
-- KEYS[3] = pipeline:limit:{name}:reserved (hash lease -> tokens reserved)
-- ARGV[1] = lease (one per attempt: a second acquire of the same lease admits it again
--           and charges nothing)
-- ARGV[2] = ms per request (60000 / requests per minute), 0 for no request rate
-- ARGV[3] = ms per token (60000 / tokens per minute), 0 for no token rate
-- ARGV[4] = concurrency, 0 for none
-- ARGV[5] = tokens to reserve (the call's estimate)
-- ARGV[6] = the lease's life, ms (a call whose worker died gives its slot back then)
-- ARGV[7] = the window, ms (60000): at most a window's worth is admitted at once
-- ARGV[8] = how far ahead the request rate may run, ms: its burst (the window, unless the
--           limit says fewer requests at once)
-- Returns {'ok'}, {'wait', ms, reason} (reason: requests, tokens, concurrency, or
-- rate_limited: the API answered 429 and asked to wait) or {'never', reason} (one call
-- costs more than the whole window allows).
--
-- Adaptive: the hash's `factor` (1 when absent) scales the rates and the concurrency
-- down after the API itself refused calls (settle.lua: multiplicative decrease) and back up
-- as calls succeed (additive increase); `blocked_until` holds every call until then.
--
-- GCRA: a rate keeps one time, when the limit would be empty again (tat). A call of cost
-- c is admitted when max(tat, now) + c x interval stays within the window from now; the
-- wait is how far past it would go. A call always passes an empty limit, however much the
-- factor scaled its cost up (else a slowed limit could refuse every call, and never recover).
--
-- Leases that ran out (their callers died) are trimmed, with what they reserved: at every
-- call of a limit with a concurrency, now and then for the others.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease, window = ARGV[1], tonumber(ARGV[7])
local held = redis.call('ZSCORE', KEYS[2], lease)
if held and tonumber(held) > now then return {'ok'} end  -- admitted before, still held
local h = redis.call('HMGET', KEYS[1], 'factor', 'blocked_until', 'requests', 'tokens')
local factor = tonumber(h[1] or '1')
local function check(tat, interval, cost, ahead)
  if interval <= 0 or cost <= 0 then return nil, 0 end
  if cost * interval > ahead then return 'never', 0 end
  tat = math.max(tonumber(tat or now), now)
  local scaled = cost * interval / factor
  local next = tat + scaled
  ahead = math.max(ahead, scaled)  -- an empty limit admits it
  if next - now > ahead then return 'wait', next - ahead - now end
  return nil, next
end
local function trim()  -- leases that ran out, and what they reserved
  local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 256)
  if #dead > 0 then
    redis.call('ZREM', KEYS[2], unpack(dead))
    redis.call('HDEL', KEYS[3], unpack(dead))
  end
end
local rate_req, rate_tok = tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = tonumber(ARGV[5])
local verdict_r, next_r = check(h[3], rate_req, 1, tonumber(ARGV[8]))
local verdict_t, next_t = check(h[4], rate_tok, tokens, window)
if verdict_r == 'never' then return {'never', 'requests'} end
if verdict_t == 'never' then return {'never', 'tokens'} end
local wait, reason = 0, ''
if verdict_r == 'wait' and next_r > wait then wait, reason = next_r, 'requests' end
if verdict_t == 'wait' and next_t > wait then wait, reason = next_t, 'tokens' end
local blocked = tonumber(h[2] or '0') - now
if blocked > wait then wait, reason = blocked, 'rate_limited' end
local concurrency = tonumber(ARGV[4])
if concurrency > 0 then
  concurrency = math.max(1, math.floor(concurrency * factor))
  trim()
  if redis.call('ZCARD', KEYS[2]) >= concurrency then
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    local until_free = math.min(tonumber(first[2]) - now, 1000)  -- a release may come first
    if until_free > wait then wait, reason = until_free, 'concurrency' end
  end
elseif now % 64 == 0 then
  trim()  -- now and then: nothing counts them
end
-- what `pipeline limits` shows: the limit as its callers define it, and the refusals
local fields = {'ms_per_request', ARGV[2], 'ms_per_token', ARGV[3], 'concurrency', ARGV[4]}
local keep = math.max(2 * window, tonumber(ARGV[6]))
if reason ~= '' then
  wait = math.max(1, math.ceil(wait))
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('HINCRBY', KEYS[1], 'throttled', 1)
  redis.call('HINCRBY', KEYS[1], 'throttled_ms', wait)
  redis.call('PEXPIRE', KEYS[1], keep)
  return {'wait', tostring(wait), reason}
end
if rate_req > 0 then fields[#fields + 1] = 'requests'; fields[#fields + 1] = tostring(next_r) end
if rate_tok > 0 and tokens > 0 then
  fields[#fields + 1] = 'tokens'; fields[#fields + 1] = tostring(next_t)
  redis.call('HSET', KEYS[3], lease, tostring(tokens))
  redis.call('PEXPIRE', KEYS[3], keep)
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), lease)
redis.call('PEXPIRE', KEYS[1], keep)
redis.call('PEXPIRE', KEYS[2], keep)
return {'ok'}
