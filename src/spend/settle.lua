-- Corrects a reservation's counters once the real usage is known (or
-- refunds it), in the windows it was charged in, all in one atomic step.
--
-- KEYS[1]: a key of the namespace's hash slot (see reserve.lua)
-- ARGV[1]: the namespace, ARGV[2]: the minute, ARGV[3]: the day
-- ARGV[4..]: per correction, three values: window ('m' or 'd'), field, delta
local ns = ARGV[1]
local keys = { m = '{' .. ns .. '}:m:' .. ARGV[2], d = '{' .. ns .. '}:d:' .. ARGV[3] }
for i = 4, #ARGV, 3 do
  local key = keys[ARGV[i]]
  -- A counter whose window has expired is over: nothing left to correct
  -- (and recreating it would leave a hash without an expiry).
  if redis.call('HEXISTS', key, ARGV[i + 1]) == 1 then
    local v = redis.call('HINCRBY', key, ARGV[i + 1], ARGV[i + 2])
    if v < 0 then
      redis.call('HSET', key, ARGV[i + 1], 0)
    end
  end
end
return 1
