-- Included before the scripts that read a workflow run's recorded route (seal, rejoin).
-- sealed_stage(steps, keys): the versions the hash `steps` holds for step keys `keys`, in
-- their order and comma-separated, when every one is sealed; else nil.
-- stage_of(route, step): the index (from 0) of the workflow stage that holds step key
-- `step` in the route JSON `route` (the run record's `route` field), and the stage's step
-- keys and the route's stages; nil for a run without a route (or a choreography's).
local function stage_of(route, step)
  if not route then return nil end
  local ok, r = pcall(cjson.decode, route)
  if not ok or type(r) ~= 'table' or type(r.stages) ~= 'table' then return nil end
  for i, keys in ipairs(r.stages) do
    for _, key in ipairs(keys) do
      if key == step then return i - 1, keys, r.stages end
    end
  end
  return nil
end
local function sealed_stage(steps, keys)
  local versions = redis.call('HMGET', steps, unpack(keys))
  for _, v in ipairs(versions) do if not v then return nil end end
  return table.concat(versions, ',')
end
