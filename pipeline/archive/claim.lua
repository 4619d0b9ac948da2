-- Hand out the next batch: the candidates still in the backlog, taken out of it and
-- numbered at once, so that no run is ever in two batches. While a batch is being
-- written, it is the one handed out (an archiver that died left it to the next).
-- KEYS[1] = pipeline:{archive}:batch, KEYS[2] = :seq, KEYS[3] = :waiting
-- ARGV[1] = now (ms)
-- ARGV[2] = the newest batch number the tables hold, as far as the caller knows: numbers
--           go on from it, so that a Redis that lost its counter never hands out a number a
--           table holds already (the batch would write nothing there)
-- ARGV[3] = '1' when the caller read ARGV[2] from the tables just now, else '0'
-- ARGV[4..] = candidate run ids, oldest first
-- Returns {number, runs as JSON, at}; {'stale'} when the counter is missing or behind
-- ARGV[2] and ARGV[2] was not read just now (read the tables, and ask again); or {}
-- when there is nothing to write.
local pending = redis.call('HMGET', KEYS[1], 'number', 'runs', 'at')
if pending[1] then return pending end
local seq = redis.call('GET', KEYS[2])
local behind = not seq or tonumber(seq) < tonumber(ARGV[2])
if behind and ARGV[3] ~= '1' then return {'stale'} end
local taken = {}
for i = 4, #ARGV do
  if redis.call('ZREM', KEYS[3], ARGV[i]) == 1 then taken[#taken + 1] = ARGV[i] end
end
if #taken == 0 then return {} end
if behind then redis.call('SET', KEYS[2], ARGV[2]) end
local number = tostring(redis.call('INCR', KEYS[2]))
local runs = cjson.encode(taken)
redis.call('HSET', KEYS[1], 'number', number, 'runs', runs, 'at', ARGV[1])
return {number, runs, ARGV[1]}
