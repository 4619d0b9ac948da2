-- Move the archiver's cursor over RUNS_INDEX and put the runs it walked past in the
-- backlog, once: only if the cursor is still where this archiver read it (another that
-- walked the same runs first wins, and this one's walk is dropped).
-- KEYS[1] = pipeline:{archive}:cursor, KEYS[2] = pipeline:{archive}:waiting
-- ARGV[1] = the cursor as read ('' before any walk), ARGV[2] = the new cursor,
-- ARGV[3] = when to look at the runs (ms), ARGV[4..] = the run ids walked
-- Returns 1 when walked, 0 when the cursor had moved.
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
for i = 4, #ARGV do redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[i]) end
return 1
