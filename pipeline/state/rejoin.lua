-- Join a parallel stage again, for a chord member that opened its step sealed already.
-- KEYS[1] = pipeline:{run}:steps       (hash step key -> version)
-- KEYS[2] = pipeline:{run}:run         (hash: the run's record)
-- KEYS[3] = pipeline:{run}:deliveries  (hash step key -> deliveries so far)
-- KEYS[4] = pipeline:{run}:log         (stream: what happened)
-- ARGV[1] = the member's step key
-- ARGV[2] = the Celery group id of its chord
-- ARGV[3] = the trace entry to write when it joins: stage.rejoined, or stage.joined (the
--           first join of a run that recorded no route, which its seal could not make)
-- ARGV[4] = the run's route (JSON) when its record holds none, else ''
-- Returns {joined} (the stage's versions, comma-separated, in stage order: send the
-- chord's body with them), {} (nothing to send) or {'?'} (no route to go by).
--
-- The member that sealed last joined the stage in its seal (seal.lua). Its worker may
-- have died before it sent the body: the member's message is delivered again, opens
-- sealed, and sends the body once more if no step of the next stage was delivered or
-- sealed yet. A chord sent again for a complete stage (a resume, a re-drive) has no
-- member that seals: the first of its members to get here joins it. Another member of
-- the chord that joined does not.
local status = redis.call('HGET', KEYS[2], 'status')
if status ~= 'running' then return {} end
local route = redis.call('HGET', KEYS[2], 'route') or ARGV[4]
if route == '' then return {'?'} end
local stage, keys, stages = stage_of(route, ARGV[1])
if not stage or not stages[stage + 2] then return {} end
local joined = sealed_stage(KEYS[1], keys)
if not joined then return {} end
for _, key in ipairs(stages[stage + 2]) do
  if redis.call('HEXISTS', KEYS[1], key) == 1 or redis.call('HEXISTS', KEYS[3], key) == 1 then
    return {}
  end
end
local field = 'join:' .. stage
local held = redis.call('HGET', KEYS[2], field)
if held then
  local group, step = string.match(held, '^(.-)|(.*)$')
  if group == ARGV[2] and step ~= ARGV[1] then return {} end
end
redis.call('HSET', KEYS[2], field, ARGV[2] .. '|' .. ARGV[1])
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('XADD', KEYS[4], '*', 'event', ARGV[3], 'at', now, 'step', ARGV[1],
  'stage', tostring(stage), 'joined', joined)
return {joined}
