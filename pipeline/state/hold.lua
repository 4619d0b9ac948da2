-- A live worker's heartbeat: it holds these tasks' messages (waiting for an ETA, reserved,
-- or running) until now + the lease. Holds that ran out long ago are trimmed.
-- KEYS[1] = pipeline:held  (sorted set: task id -> until when it is held, ms)
-- ARGV[1] = lease, ms
-- ARGV[2..] = task ids
-- Returns how many task ids it holds.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
for i = 2, #ARGV, 500 do
  local args = {}
  for j = i, math.min(i + 499, #ARGV) do
    args[#args + 1] = until_ms
    args[#args + 1] = ARGV[j]
  end
  redis.call('ZADD', KEYS[1], unpack(args))
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 10 * tonumber(ARGV[1]))
return #ARGV - 1
