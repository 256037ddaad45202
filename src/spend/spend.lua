-- Spend control's one atomic step in Redis: applies the settlements that
-- were waiting, then checks and charges one admission, all or nothing.
-- Settlements ride along with the next admission so that a request costs
-- one round trip, not two.
--
-- KEYS[1]: a key of the namespace's hash slot (declares the slot for Redis
--          Cluster; every window hash shares its hash tag; it is not written)
-- ARGV[1]: the namespace (the hash tag)
-- ARGV[2]: how many settlement corrections follow, c
-- then c times: window ('m' or 'd'), the window's id (the one the
--               reservation was charged in), field, delta
-- then per check: window ('m' or 'd'), field, amount, limit (-1: counted,
--               not limited); none: the call only settles
-- Returns {1} when it only settled; {1, minute, day, counter after
-- charge...} when admitted; {0, index of the refusing check (1-based), now,
-- every checked counter...} when refused (no check charged; the
-- settlements are applied either way).
local prefix = '{' .. ARGV[1] .. '}:'
local c = tonumber(ARGV[2])
local first = 3 + 4 * c
for i = 3, first - 1, 4 do
  local key = prefix .. ARGV[i] .. ':' .. ARGV[i + 1]
  -- A counter whose window has expired is over: nothing left to correct
  -- (and recreating it would leave a hash without an expiry).
  if redis.call('HEXISTS', key, ARGV[i + 2]) == 1 then
    if redis.call('HINCRBY', key, ARGV[i + 2], ARGV[i + 3]) < 0 then
      redis.call('HSET', key, ARGV[i + 2], 0)
    end
  end
end
local n = (#ARGV - first + 1) / 4
if n < 1 then
  return { 1 }
end
-- The windows come from Redis's clock, so every replica counts in the
-- same minute and day.
local t = redis.call('TIME')
local now = tonumber(t[1])
local minute = math.floor(now / 60)
local day = math.floor(now / 86400)
local keys = { m = prefix .. 'm:' .. minute, d = prefix .. 'd:' .. day }
local current = {}
local refused = 0
for i = 0, n - 1 do
  local at = first + i * 4
  current[i + 1] = tonumber(redis.call('HGET', keys[ARGV[at]], ARGV[at + 1]) or '0')
  local limit = tonumber(ARGV[at + 3])
  if refused == 0 and limit >= 0 and current[i + 1] + tonumber(ARGV[at + 2]) > limit then
    refused = i + 1
  end
end
if refused > 0 then
  local out = { 0, refused, now }
  for i = 1, n do
    out[#out + 1] = current[i]
  end
  return out
end
local out = { 1, minute, day }
local fresh = {}
for i = 0, n - 1 do
  local at = first + i * 4
  -- HINCRBY, not a sum written back: Redis adds 64-bit integers exactly,
  -- where Lua's numbers are doubles.
  local after = redis.call('HINCRBY', keys[ARGV[at]], ARGV[at + 1], ARGV[at + 2])
  -- A counter found at 0 (absent, or refunded to nothing) may be its
  -- window's first: the window's hash is given an expiry (a minute's lives
  -- two minutes, a day's two days). Any other was set up before.
  if current[i + 1] == 0 then
    fresh[ARGV[at]] = true
  end
  out[#out + 1] = after
end
if fresh.m then
  redis.call('EXPIRE', keys.m, 120)
end
if fresh.d then
  redis.call('EXPIRE', keys.d, 172800)
end
return out
