-- A run that is no longer live (it failed, is compensating, was cancelled) seals no more
-- steps: every reservation its steps still hold of its budget is dropped, so what it shows
-- is what it spent. Included by the scripts that end a run's life (finish.lua, the saga's
-- begin.lua, choreography's emit.lua).
local function release_budget(run_key)
  if not redis.call('HGET', run_key, 'reserved_tokens') then return end
  for _, field in ipairs(redis.call('HKEYS', run_key)) do
    if string.sub(field, 1, 8) == 'reserve:' then redis.call('HDEL', run_key, field) end
  end
  redis.call('HSET', run_key, 'reserved_tokens', '0', 'reserved_cost', '0')
end
