-- Checks and charges one admission's counters, all or nothing, in one
-- atomic step. The windows come from Redis's clock, so every replica
-- counts in the same minute and day.
--
-- KEYS[1]: a key of the namespace's hash slot (declares the slot for Redis
--          Cluster; the window hashes share its hash tag; it is not written)
-- ARGV[1]: the namespace (the hash tag)
-- ARGV[2..]: per counter, four values: window ('m' or 'd'), field, amount,
--            limit (-1: counted, not limited)
-- Returns {1, minute, day, counter after charge...} when admitted, or
-- {0, index of the refusing counter (1-based), now, every counter before...}
-- when refused (nothing charged).
local t = redis.call('TIME')
local now = tonumber(t[1])
local minute = math.floor(now / 60)
local day = math.floor(now / 86400)
local ns = ARGV[1]
local keys = { m = '{' .. ns .. '}:m:' .. minute, d = '{' .. ns .. '}:d:' .. day }
local n = (#ARGV - 1) / 4
local current = {}
local refused = 0
for i = 0, n - 1 do
  local base = 2 + i * 4
  current[i + 1] = tonumber(redis.call('HGET', keys[ARGV[base]], ARGV[base + 1]) or '0')
  local limit = tonumber(ARGV[base + 3])
  if refused == 0 and limit >= 0 and current[i + 1] + tonumber(ARGV[base + 2]) > limit then
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
for i = 0, n - 1 do
  local base = 2 + i * 4
  out[#out + 1] = redis.call('HINCRBY', keys[ARGV[base]], ARGV[base + 1], ARGV[base + 2])
end
-- The counters expire on their own: a minute's after two, a day's after two.
redis.call('EXPIRE', keys.m, 120)
redis.call('EXPIRE', keys.d, 172800)
return out
