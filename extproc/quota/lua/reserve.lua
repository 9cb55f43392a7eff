-- reserve(id, tokens, micro, lease ms, retention ms, n, record, checks...)
-- `record` is the JSON list of the ledger fields written if the lease
-- expires unsettled ('' for none). Checks as parse_new_checks reads them.

local id, tokens, micro = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, retention, n = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local record = ARGV[7]
local now = now_ms()
sweep(now, retention)

local existing = load_record(id)
if existing then
  return reply_ok(existing, {})
end

local checks, windows = parse_new_checks(n, 8, 6, now)
if checks == nil then
  return skew()
end
local states, worst = judge(checks, tokens, micro, now)
if worst then
  return reply_no(worst, states)
end
take(checks, tokens, micro, now, retention)
local r = {s = 'open', t = tokens, m = micro, d = now + lease, dt = 0, dm = 0, w = windows}
if record ~= '' then
  r.l = record
end
save_record(id, r)
redis.call('ZADD', LEASES, r.d, id)
return reply_ok(r, states)
