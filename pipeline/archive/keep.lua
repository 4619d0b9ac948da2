-- Set how long a run stays in Redis, from the archiver. Archived (ARGV[1] > 0): its record
-- says so, and its keys live ARGV[2] seconds at most (never longer than they had; a key
-- without a time to live, a live run's, is left so). A run started with an idempotency key
-- keeps the time it had: its key returns the same run for as long as before. Not archivable
-- yet (ARGV[1] = 0): its keys live ARGV[2] seconds at least (never shorter).
-- KEYS = the run's keys (RunKeys.all(): KEYS[3] its record)
-- ARGV[1] = the batch that archived it, or 0; ARGV[2] = seconds
-- Returns 1, or 0 when Redis no longer has the run.
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
local key = redis.call('HGET', KEYS[3], 'idempotency_key') or ''
local archived = ARGV[1] ~= '0'
if archived then
  local t = redis.call('TIME')
  local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  redis.call('HSET', KEYS[3], 'archived', ARGV[1], 'archived_at', now)
  if key ~= '' then return 1 end
end
local s = tonumber(ARGV[2])
for i = 1, #KEYS do
  local ttl = redis.call('TTL', KEYS[i])
  if (archived and ttl > s) or (not archived and ttl >= 0 and ttl < s) then
    redis.call('EXPIRE', KEYS[i], s)
  end
end
return 1
