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
local outcome, dt, dm = close_hold(id, r, parse_checks(n, 7, 6), tokens, micro, record, now, retention)
return {outcome, dt, dm}
