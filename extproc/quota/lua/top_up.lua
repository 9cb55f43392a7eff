-- top_up(id, tokens, micro, lease ms, retention ms, n, checks...)
-- Budget checks name the period the reservation was charged to.

local id, tokens, micro = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, retention, n = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
sweep(now, retention)

local r = load_record(id)
if r and r.s == 'open' and r.d <= now then
  expire(id, r, now)
end
if r == nil then
  return {'gone', 'unknown'}
end
if r.s ~= 'open' then
  return {'gone', r.s}
end

local checks = parse_checks(n, 7, 6)
local states, worst = judge(checks, tokens, micro, now)
if worst then
  return reply_no(worst, states)
end
take(checks, tokens, micro, now, retention)
r.t, r.m, r.d = r.t + tokens, r.m + micro, now + lease
save_record(id, r)
redis.call('ZADD', LEASES, r.d, id)
return reply_ok(r, states)
