-- Append one entry to a run's log, only while the run exists (never re-creates
-- the log of a run that retention already removed).
-- KEYS[1] = pipeline:{run}:run  (hash: the run's record)
-- KEYS[2] = pipeline:{run}:log  (stream: what happened)
-- ARGV    = field, value, field, value, ... (an 'at' field is added)
-- Returns 1 when written, 0 when the run does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('XADD', KEYS[2], '*', 'at', now, unpack(ARGV))
return 1
