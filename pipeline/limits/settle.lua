-- Settle a call admitted under a named limit: give its concurrency slot back, and charge
-- the tokens it used against those it reserved. Once per lease: a second settle finds
-- nothing and changes nothing.
-- KEYS = as acquire.lua
-- ARGV[1] = lease
-- ARGV[2] = ms per token (0 for no token rate)
-- ARGV[3] = tokens the call used
-- Returns {'settled', used - reserved} or {'none'} (settled before, or its lease ran out).
--
-- A refund (used less than reserved) moves the token rate's time back, never before now;
-- an overrun moves it on past the window if it must: a debt that later calls wait out.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = ARGV[1]
if not redis.call('ZSCORE', KEYS[2], lease) then return {'none'} end
redis.call('ZREM', KEYS[2], lease)
local reserved = tonumber(redis.call('HGET', KEYS[3], lease) or '0')
redis.call('HDEL', KEYS[3], lease)
local interval, used = tonumber(ARGV[2]), tonumber(ARGV[3])
local diff = used - reserved
if interval > 0 and diff ~= 0 then
  local tat = tonumber(redis.call('HGET', KEYS[1], 'tokens') or now)
  if diff > 0 then tat = math.max(tat, now) + diff * interval
  else tat = math.max(tat + diff * interval, now) end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tat))
end
return {'settled', tostring(diff)}
