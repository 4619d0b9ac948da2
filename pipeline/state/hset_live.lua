-- Set one field of a run's record, only while the run exists (never re-creates the record
-- of a run that retention removed).
-- KEYS[1] = pipeline:{run}:run  (hash: the run's record)
-- ARGV[1] = field, ARGV[2] = value
-- Returns 1 when written, 0 when the run does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
