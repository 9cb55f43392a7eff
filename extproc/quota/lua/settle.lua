-- settle(id, actual tokens, actual micro, retention ms, n, checks...)
-- Applies actual - reserved to the same buckets and periods, once.

local id, tokens, micro = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local retention, n = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
sweep(now, retention)

local r = load_record(id)
if r == nil then
  return {'unknown', 0, 0}
end
if r.s == 'settled' then
  return {'duplicate', r.dt, r.dm}
end
if r.s == 'open' and r.d <= now then
  expire(id, r, now)
end

local outcome = 'settled'
if r.s == 'expired' then
  outcome = 'late'
end
local dt, dm = tokens - r.t, micro - r.m
take(parse_checks(n, 6, 4), dt, dm, now, retention)
r.s, r.dt, r.dm = 'settled', dt, dm
save_record(id, r)
redis.call('ZREM', LEASES, id)
redis.call('ZADD', CLOSED, now, id)
return {outcome, dt, dm}
