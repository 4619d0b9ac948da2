-- Seal a step's output as the run's next version: one atomic append.
-- KEYS[1] = pipeline:{run}:states      (stream of sealed versions)
-- KEYS[2] = pipeline:{run}:steps       (hash step key -> version)
-- KEYS[3] = pipeline:{run}:run         (hash: the run's record)
-- KEYS[4] = pipeline:{run}:log         (stream: what happened)
-- KEYS[5] = pipeline:{run}:deliveries  (hash step key -> deliveries so far)
-- KEYS[6..] = the run's other keys (saga, undo): given their retention with the rest
-- ARGV[1] = step key
-- ARGV[2] = agent name
-- ARGV[3] = output contract (name@version)
-- ARGV[4] = canonical JSON of the payload
-- ARGV[5] = sha256 of ARGV[4]
-- ARGV[6] = parents, a JSON list of version numbers
-- ARGV[7] = '1' when this step ends the run (it then succeeds), else '0'
-- ARGV[8] = retention of a finished run, seconds
-- ARGV[9] = '1' when the output is degraded, else '0'
-- ARGV[10] = worker host name
-- ARGV[11] = the step's latency so far, milliseconds
-- ARGV[12] = the Celery group id of the chord this step is a member of, '' for none
-- ARGV[13..] = more field, value pairs for the step's trace entry (token usage)
-- The budget: a step that reserved some of its run's budget (open_step.lua) is charged
-- what it used, read from its trace fields (prompt_tokens, completion_tokens; without
-- them, its estimate; a degraded stand-in, nothing), and its reservation is dropped.
-- Returns {'new', version, at_ms, joined}, {'sealed', version} (this step key was sealed
-- before: the same version, nothing written), {'missing'} or {'aborted', status}.
--
-- The chord's join: a member of a parallel stage (ARGV[12] set) whose seal completes
-- the stage (every step key of it sealed, this one last) joins it. It records the join
-- in the run's record (`join:<stage>` = `<group>|<step>`: atomic, so exactly one seal
-- joins a stage) and returns `joined`, the stage's versions in stage order as
-- comma-separated numbers, for the chord's body; '' for any other seal; '?' for a member
-- of a run that recorded no route (the caller joins with a route of its own, rejoin.lua).
local sealed = redis.call('HGET', KEYS[2], ARGV[1])
if sealed then return {'sealed', sealed} end
local h = redis.call('HMGET', KEYS[3], 'status', 'reserve:' .. ARGV[1])
local status, reserved = h[1], h[2]  -- and what the step reserved of its run's budget
if not status then return {'missing'} end
if status ~= 'running' and status ~= 'waiting_for_human' then return {'aborted', status} end
local v = tostring(redis.call('HINCRBY', KEYS[3], 'head', 1))
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('XADD', KEYS[1], v .. '-1',
  'version', v, 'parents', ARGV[6], 'agent', ARGV[2], 'contract', ARGV[3],
  'payload', ARGV[4], 'digest', ARGV[5], 'created_at', now, 'step', ARGV[1],
  'degraded', ARGV[9])
redis.call('HSET', KEYS[2], ARGV[1], v)
redis.call('HSET', KEYS[3], 'updated_at', now)
if ARGV[9] == '1' then redis.call('HSET', KEYS[3], 'degraded', '1') end
local entry = {'event', 'step.sealed', 'at', now, 'step', ARGV[1], 'agent', ARGV[2],
  'version', v, 'parents', ARGV[6], 'worker', ARGV[10], 'latency_ms', ARGV[11],
  'degraded', ARGV[9]}
for i = 13, #ARGV do entry[#entry + 1] = ARGV[i] end
local joined = ''
if ARGV[12] ~= '' then
  local route = redis.call('HGET', KEYS[3], 'route')
  local stage, keys = stage_of(route, ARGV[1])
  if not route then joined = '?' end  -- a run from before routes: the caller finds its own
  local complete = stage and sealed_stage(KEYS[2], keys)
  if complete then
    joined = complete
    redis.call('HSET', KEYS[3], 'join:' .. stage, ARGV[12] .. '|' .. ARGV[1])
    entry[#entry + 1] = 'joined'
    entry[#entry + 1] = joined
  end
end
redis.call('XADD', KEYS[4], '*', unpack(entry))
if reserved then
  local r = {}
  for x in string.gmatch(reserved, '[^|]+') do r[#r + 1] = tonumber(x) end
  local used = {}
  for i = 13, #ARGV - 1, 2 do used[ARGV[i]] = tonumber(ARGV[i + 1]) end
  local tokens, cost = r[1], r[2]
  if used.prompt_tokens or used.completion_tokens then
    local p, c = used.prompt_tokens or 0, used.completion_tokens or 0
    tokens, cost = p + c, (p * r[3] + c * r[4]) / 1000
  end
  if ARGV[9] == '1' then tokens, cost = 0, 0 end
  redis.call('HDEL', KEYS[3], 'reserve:' .. ARGV[1])
  redis.call('HINCRBYFLOAT', KEYS[3], 'reserved_tokens', -r[1])
  redis.call('HINCRBYFLOAT', KEYS[3], 'reserved_cost', -r[2])
  redis.call('HINCRBYFLOAT', KEYS[3], 'spent_tokens', tokens)
  redis.call('HINCRBYFLOAT', KEYS[3], 'spent_cost', cost)
end
if ARGV[7] == '1' then
  redis.call('HSET', KEYS[3], 'status', 'succeeded', 'output_version', v, 'finished_at', now)
  redis.call('XADD', KEYS[4], '*', 'event', 'run.succeeded', 'at', now, 'version', v)
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[8]) end
end
return {'new', v, now, joined}
