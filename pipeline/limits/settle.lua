-- Settle a call admitted under a named limit: give its concurrency slot back, and charge
-- the tokens it used against those it reserved. Once per lease: a second settle finds
-- nothing and changes nothing.
-- KEYS = as acquire.lua
-- ARGV[1] = lease
-- ARGV[2] = ms per token (0 for no token rate)
-- ARGV[3] = tokens the call used
-- ARGV[4] = ms per request to give back: the call was never made (its step did not run),
--           so its request is refunded too; 0 keeps the request charged
-- ARGV[5] = how the call went, for the adaptive factor: 'ok' (it succeeded: additive
--           increase, by ARGV[7]), 'limited' (the API refused it, 429: multiplicative
--           decrease, halved, at most once a second, and every call held ARGV[6] ms), or ''
-- ARGV[6] = ms the API asked to wait (Retry-After), for 'limited'
-- ARGV[7] = the additive increase of the factor per call that succeeded
-- Returns {'settled', used - reserved} or {'none'} (settled before, or its lease ran out).
--
-- A refund (used less than reserved, a request not made) moves the rate's time back,
-- never before now; an overrun moves it on past the window if it must: a debt that later
-- calls wait out.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = ARGV[1]
local h = redis.call('HMGET', KEYS[1], 'factor', 'decreased_at', 'blocked_until', 'tokens',
  'requests')
local factor = tonumber(h[1] or '1')
local set = {}  -- the limit's fields this settle changes, written in one HSET
local keep = 120000  -- the least life the limit's hash keeps after a change (two windows)
if ARGV[5] == 'limited' then  -- even for a lease run out: the API's answer stands
  if now - tonumber(h[2] or '0') >= 1000 then
    set[#set + 1] = 'factor'; set[#set + 1] = tostring(math.max(factor / 2, 1 / 64))
    set[#set + 1] = 'decreased_at'; set[#set + 1] = tostring(now)
    redis.call('HINCRBY', KEYS[1], 'rate_limited', 1)
  end
  local until_ = now + tonumber(ARGV[6])
  if until_ > tonumber(h[3] or '0') then
    set[#set + 1] = 'blocked_until'; set[#set + 1] = tostring(until_)
  end
  keep = math.max(keep, 2 * tonumber(ARGV[6]))
end
local held = redis.call('ZSCORE', KEYS[2], lease)
local reply = {'none'}
if held then
  redis.call('ZREM', KEYS[2], lease)
  local reserved = tonumber(redis.call('HGET', KEYS[3], lease) or '0')
  if reserved > 0 then redis.call('HDEL', KEYS[3], lease) end
  if tonumber(held) > now then  -- else it ran out: its slot came back, its tokens are spent
    -- what the call was charged, it is refunded or charged more: at the factor now
    local function move(field, tat, by)
      tat = tonumber(tat or now)
      if by > 0 then tat = math.max(tat, now) + by else tat = math.max(tat + by, now) end
      set[#set + 1] = field; set[#set + 1] = tostring(tat)
    end
    local interval, used = tonumber(ARGV[2]) / factor, tonumber(ARGV[3])
    local diff = used - reserved
    if interval > 0 and diff ~= 0 then move('tokens', h[4], diff * interval) end
    if tonumber(ARGV[4]) > 0 then move('requests', h[5], -tonumber(ARGV[4]) / factor) end
    if ARGV[5] == 'ok' and factor < 1 then  -- once per lease: a second settle finds none
      set[#set + 1] = 'factor'; set[#set + 1] = tostring(math.min(1, factor + tonumber(ARGV[7])))
    end
    reply = {'settled', tostring(diff)}
  end
end
if #set > 0 then
  redis.call('HSET', KEYS[1], unpack(set))
  -- never shorten the life acquire gave it; give one to a hash this HSET created again
  if redis.call('PTTL', KEYS[1]) < keep then redis.call('PEXPIRE', KEYS[1], keep) end
end
return reply
