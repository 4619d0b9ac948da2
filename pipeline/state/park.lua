-- Park a live run for a person: its status becomes waiting_for_human (the `park`
-- fallback). Steps already under way may still seal; the parked step does not run.
-- Several steps of one parallel group may park; each is remembered.
-- KEYS[1] = pipeline:{run}:run  (hash: the run's record)
-- KEYS[2] = pipeline:{run}:log  (stream: what happened)
-- ARGV[1] = parked step key
-- ARGV[2] = agent of that step
-- ARGV[3] = why (for the alert)
-- Returns 1 when parked, 0 when the run is not live.
local h = redis.call('HMGET', KEYS[1], 'status', 'parked_steps')
if h[1] ~= 'running' and h[1] ~= 'waiting_for_human' then return 0 end
local parked = h[2] or ''
if not string.find(',' .. parked .. ',', ',' .. ARGV[1] .. ',', 1, true) then
  parked = parked == '' and ARGV[1] or (parked .. ',' .. ARGV[1])
end
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[1], 'status', 'waiting_for_human', 'parked_steps', parked,
  'updated_at', now)
redis.call('XADD', KEYS[2], '*', 'event', 'run.parked', 'at', now, 'step', ARGV[1],
  'agent', ARGV[2], 'alert', ARGV[3])
return 1
