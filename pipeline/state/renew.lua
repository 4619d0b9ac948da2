-- Renew the lease of a step its task is still running (the worker's heartbeat).
-- KEYS[1] = pipeline:{run}:leases  (hash step key -> task id|lease deadline ms|worker)
-- ARGV[1] = step key
-- ARGV[2] = task id holding the step
-- ARGV[3] = lease, ms from now
-- Returns 1, or 0 when the task no longer holds the step (it sealed, or another took it).
local held = redis.call('HGET', KEYS[1], ARGV[1])
if not held then return 0 end
local task, _, worker = string.match(held, '^([^|]*)|([^|]*)|(.*)$')
if task ~= ARGV[2] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], task .. '|' .. tostring(now + tonumber(ARGV[3])) .. '|' .. worker)
return 1
