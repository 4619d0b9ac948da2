-- A batch every table committed and whose runs are marked: no longer pending.
-- KEYS[1] = pipeline:{archive}:batch, KEYS[2] = pipeline:{archive}:stats
-- ARGV[1] = the batch's number, ARGV[2] = runs in it
-- Returns 1, or 0 when another archiver finished it first.
if redis.call('HGET', KEYS[1], 'number') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HINCRBY', KEYS[2], 'runs', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'batches', 1)
redis.call('HSET', KEYS[2], 'last_batch', ARGV[1], 'last_ok_at', now)
return 1
