-- Bring a run read back from the archive into Redis, whole or not at all, for as long as
-- an archived run stays there. Never over a run Redis still has.
-- KEYS = the run's keys (RunKeys.all(): states, steps, run, log, ...)
-- ARGV[1] = JSON array aligned with KEYS: [type, data] or null; a hash's and a stream
--           entry's fields as a flat list (field, value, ...), a stream as [[id, flat], ...]
-- ARGV[2] = seconds the keys live
-- Returns 1 when restored, 0 when the run was there.
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local keys = cjson.decode(ARGV[1])
for i = 1, #KEYS do
  local k = keys[i]
  if type(k) == 'table' then
    local kind, data = k[1], k[2]
    redis.call('DEL', KEYS[i])
    if kind == 'hash' and #data > 0 then
      redis.call('HSET', KEYS[i], unpack(data))
    elseif kind == 'stream' then
      for _, entry in ipairs(data) do
        redis.call('XADD', KEYS[i], entry[1], unpack(entry[2]))
      end
    elseif kind == 'string' then
      redis.call('SET', KEYS[i], data)
    elseif kind == 'list' and #data > 0 then
      redis.call('RPUSH', KEYS[i], unpack(data))
    elseif kind == 'set' and #data > 0 then
      redis.call('SADD', KEYS[i], unpack(data))
    elseif kind == 'zset' then
      for _, pair in ipairs(data) do redis.call('ZADD', KEYS[i], pair[2], pair[1]) end
    end
    redis.call('EXPIRE', KEYS[i], ARGV[2])
  end
end
return 1
