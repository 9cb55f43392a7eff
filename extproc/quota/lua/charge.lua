-- charge(id, tokens, micro, retention ms, n, record, checks...)
-- What a sidecar admitted on its own while Redis was down (fail_open): add
-- it to every check without judging, keep the id as settled (so a replay
-- charges nothing twice) and append its ledger record, in one step. Budget
-- checks choose their period as in reserve.
--
-- A reserve can reach Redis as it goes down and lose only its reply; the
-- sidecar then admits the request locally and charges it here later. Its
-- hold is then found under the same id: it is settled at what was used, on
-- its own periods, as settle does, so the request is charged once and
-- recorded at its real cost rather than at the hold when the lease runs out.

local id, tokens, micro = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local retention, n, record = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local now = now_ms()
sweep(now, retention)

local r = load_record(id)
if r and r.s == 'settled' then
  return {'duplicate', r.dt, r.dm}
end
if r then
  local held = parse_held_checks(n, 7, 6, r.w, now)
  if held == nil then
    return skew()
  end
  local outcome, dt, dm = close_hold(id, r, held, tokens, micro, record, now, retention)
  return {outcome, dt, dm}
end
local checks, windows = parse_new_checks(n, 7, 6, now)
if checks == nil then
  return skew()
end
take(checks, tokens, micro, now, retention)
if record ~= '' then
  append_record(id, cjson.decode(record), now)
end
r = {s = 'settled', t = tokens, m = micro, d = now, dt = tokens, dm = micro, w = windows}
save_record(id, r)
redis.call('ZADD', CLOSED, now, id)
return {'settled', tokens, micro}
