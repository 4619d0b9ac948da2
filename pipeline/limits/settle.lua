-- Settle a call admitted under a named limit: give its concurrency slot back, and charge
-- the tokens it used against those it reserved. Once per lease: a second settle finds
-- nothing and changes nothing.
-- KEYS = as acquire.lua
-- ARGV[1] = lease
-- ARGV[2] = ms per token (0 for no token rate)
-- ARGV[3] = tokens the call used
-- ARGV[4] = ms per request to give back: the call was never made (its step did not run),
--           so its request is refunded too; 0 keeps the request charged
-- Returns {'settled', used - reserved} or {'none'} (settled before, or its lease ran out).
--
-- A refund (used less than reserved, a request not made) moves the rate's time back,
-- never before now; an overrun moves it on past the window if it must: a debt that later
-- calls wait out.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = ARGV[1]
if not redis.call('ZSCORE', KEYS[2], lease) then return {'none'} end
redis.call('ZREM', KEYS[2], lease)
local reserved = tonumber(redis.call('HGET', KEYS[3], lease) or '0')
redis.call('HDEL', KEYS[3], lease)
local function move(field, by)
  local tat = tonumber(redis.call('HGET', KEYS[1], field) or now)
  if by > 0 then tat = math.max(tat, now) + by else tat = math.max(tat + by, now) end
  redis.call('HSET', KEYS[1], field, tostring(tat))
end
local interval, used = tonumber(ARGV[2]), tonumber(ARGV[3])
local diff = used - reserved
if interval > 0 and diff ~= 0 then move('tokens', diff * interval) end
if tonumber(ARGV[4]) > 0 then move('requests', -tonumber(ARGV[4])) end
return {'settled', tostring(diff)}
