-- Record that the run's canvas reached the broker: lift the time-to-live a run
-- gets at creation, unless the run already ended (its retention then stands).
-- KEYS[1] = pipeline:{run}:states  (stream of sealed versions)
-- KEYS[2] = pipeline:{run}:steps   (hash step key -> version)
-- KEYS[3] = pipeline:{run}:run     (hash: the run's record)
-- KEYS[4] = pipeline:{run}:log     (stream: what happened)
-- KEYS[5..] = the run's other keys (deliveries, saga, undo, ledger, events)
-- Returns 1, or 0 when the run no longer exists (nothing is re-created).
local status = redis.call('HGET', KEYS[3], 'status')
if not status then return 0 end
redis.call('HSET', KEYS[3], 'enqueued', '1')
if status ~= 'succeeded' and status ~= 'failed' and status ~= 'compensated'
    and status ~= 'cancelled' then
  for i = 1, #KEYS do redis.call('PERSIST', KEYS[i]) end  -- not over: no expiry
end
return 1
