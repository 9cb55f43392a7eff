-- settle(id, actual tokens, actual micro, retention ms, n, record, checks...)
-- Applies actual - reserved to the same buckets and periods, once, and
-- appends `record` (a flat JSON list of ledger fields, '' for none) to the
-- ledger in the same step. A late settle replaces the `unknown` record its
-- expiry wrote.

local id, tokens, micro = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local retention, n, record = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
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
take(parse_checks(n, 7, 6), dt, dm, now, retention)
if record ~= '' then
  if r.x then
    redis.call('XDEL', STREAM, r.x)
    redis.call('ZREM', SEEN, id)
  end
  append_record(id, cjson.decode(record), now)
end
r.s, r.dt, r.dm, r.l, r.x = 'settled', dt, dm, nil, nil
save_record(id, r)
redis.call('ZREM', LEASES, id)
redis.call('ZADD', CLOSED, now, id)
return {outcome, dt, dm}
