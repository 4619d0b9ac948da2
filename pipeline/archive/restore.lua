-- Bring a run read back from the archive into Redis, whole or not at all, for as long as
-- an archived run stays there. Never over a run Redis still has.
-- KEYS = the run's keys (RunKeys.all(): states, steps, run, log, ...)
-- ARGV[1] = JSON array aligned with KEYS: [type, data] or null; a hash's and a stream
--           entry's fields as a flat list (field, value, ...), a stream as [[id, flat], ...]
-- ARGV[2] = seconds the keys live
-- Returns 1 when restored, 0 when the run was there. What could fail midway (a stream id
-- out of order) is checked by the caller before: a script's writes are not rolled back.
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
-- unpack() has a limit (a few thousand values): a big hash goes in slices of whole pairs
local function each_slice(command, key, data)
  for i = 1, #data, 1000 do
    redis.call(command, key, unpack(data, i, math.min(i + 999, #data)))
  end
end
local keys = cjson.decode(ARGV[1])
for i = 1, #KEYS do
  local k = keys[i]
  if type(k) == 'table' then
    local kind, data = k[1], k[2]
    redis.call('DEL', KEYS[i])
    if kind == 'hash' then
      each_slice('HSET', KEYS[i], data)
    elseif kind == 'stream' then
      for _, entry in ipairs(data) do
        redis.call('XADD', KEYS[i], entry[1], unpack(entry[2]))
      end
    elseif kind == 'string' then
      redis.call('SET', KEYS[i], data)
    elseif kind == 'list' then
      each_slice('RPUSH', KEYS[i], data)
    elseif kind == 'set' then
      each_slice('SADD', KEYS[i], data)
    elseif kind == 'zset' then
      for _, pair in ipairs(data) do redis.call('ZADD', KEYS[i], pair[2], pair[1]) end
    end
    redis.call('EXPIRE', KEYS[i], ARGV[2])
  end
end
return 1
