-- Move a delivery's claim from a task whose message is gone to the task sent in its place.
-- KEYS[1] = pipeline:{run}:ledger  (hash delivery key -> state; choreography only)
-- ARGV[1] = delivery key (<event>:<agent>)
-- ARGV[2] = the state it must still be in ('running:<old task>')
-- ARGV[3] = the new state ('running:<new task>')
-- Returns 1 when moved, 0 when the delivery moved on meanwhile (nothing written).
-- The new task then opens the delivery as its own (and finishes its handover if it had
-- sealed); the old one, should it turn up after all, is a duplicate.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
