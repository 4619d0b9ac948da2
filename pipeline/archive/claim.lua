-- Hand out the next batch: the candidates still in the backlog, taken out of it and
-- numbered at once, so that no run is ever in two batches. While a batch is being
-- written, it is the one handed out (an archiver that died left it to the next).
-- KEYS[1] = pipeline:{archive}:batch, KEYS[2] = :seq, KEYS[3] = :waiting
-- ARGV[1] = the newest batch number the tables hold, read just now: numbers go on from it,
--           so that a Redis that lost its counter, or went back to an older copy of it,
--           never hands out a number a table holds already (the batch would write nothing)
-- ARGV[2..] = candidate run ids, oldest first
-- Returns {number, runs as JSON, at}, or {} when there is nothing to write.
local pending = redis.call('HMGET', KEYS[1], 'number', 'runs', 'at')
if pending[1] then return pending end
local taken = {}
for i = 2, #ARGV do
  if redis.call('ZREM', KEYS[3], ARGV[i]) == 1 then taken[#taken + 1] = ARGV[i] end
end
if #taken == 0 then return {} end
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], ARGV[1])
end
local number = tostring(redis.call('INCR', KEYS[2]))
local runs = cjson.encode(taken)
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[1], 'number', number, 'runs', runs, 'at', now)
return {number, runs, now}
