-- Create a run: its record and version 0 (the input), once per run id.
-- KEYS[1] = pipeline:{run}:states  (stream of sealed versions)
-- KEYS[2] = pipeline:{run}:steps   (hash step key -> version)
-- KEYS[3] = pipeline:{run}:run     (hash: the run's record)
-- KEYS[4] = pipeline:{run}:log     (stream: what happened)
-- ARGV[1] = workflow name
-- ARGV[2] = canonical JSON of the input payload
-- ARGV[3] = sha256 of ARGV[2]
-- ARGV[4] = input contract (name@version)
-- ARGV[5] = idempotency key ('' when none)
-- ARGV[6] = seconds the run lives if it is never enqueued (mark_enqueued.lua lifts it)
-- ARGV[7] = the run's route, JSON: its flow's stages or start event, and its agents'
--           queues ('' when none): what the pipeline's own work reads instead of agent code
-- ARGV[8], ARGV[9] = the run's budget: tokens and cost ('' for none; see budget.py)
-- Returns {'created', created_at_ms} or {'exists', workflow, input_digest, enqueued, age_ms}
-- where enqueued is '1' once the client handed the run's canvas to the broker, and
-- age_ms is how long ago the run was created, by the server's clock.
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
if redis.call('EXISTS', KEYS[3]) == 1 then
  local h = redis.call('HMGET', KEYS[3], 'workflow', 'input_digest', 'enqueued', 'created_at')
  return {'exists', h[1], h[2], h[3] or '0', tostring(tonumber(now) - tonumber(h[4] or now))}
end
redis.call('XADD', KEYS[1], '0-1',
  'version', '0', 'parents', '[]', 'agent', '', 'contract', ARGV[4],
  'payload', ARGV[2], 'digest', ARGV[3], 'created_at', now, 'step', 'input', 'degraded', '0')
redis.call('HSET', KEYS[2], 'input', '0')
redis.call('HSET', KEYS[3],
  'workflow', ARGV[1], 'status', 'running', 'head', '0',
  'created_at', now, 'updated_at', now,
  'input_contract', ARGV[4], 'input_digest', ARGV[3], 'idempotency_key', ARGV[5],
  'enqueued', '0')
if ARGV[7] ~= '' then redis.call('HSET', KEYS[3], 'route', ARGV[7]) end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[3], 'budget_tokens', ARGV[8]) end
if ARGV[9] ~= '' then redis.call('HSET', KEYS[3], 'budget_cost', ARGV[9]) end
redis.call('XADD', KEYS[4], '*', 'event', 'run.created', 'at', now, 'workflow', ARGV[1],
  'version', '0')
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
return {'created', now}
