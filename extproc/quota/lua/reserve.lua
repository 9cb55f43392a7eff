-- reserve(id, tokens, micro, lease ms, retention ms, n, checks...)
-- A budget check here is 'm', limit, b0, b1, b2, b3 with three keys: the
-- previous, current and next calendar period as the caller's clock sees
-- them. The period that holds Redis TIME is the one charged.

local id, tokens, micro = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, retention, n = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
sweep(now, retention)

local existing = load_record(id)
if existing then
  return reply_ok(existing, {})
end

local checks, windows = {}, {}
local a, k = 7, 4
for _ = 1, n do
  if ARGV[a] == 'b' then
    table.insert(checks, {b = true, key = KEYS[k], cap = tonumber(ARGV[a + 1]) * UNIT, rate = tonumber(ARGV[a + 2])})
    a, k = a + 3, k + 1
  else
    local chosen = nil
    for i = 0, 2 do
      local start, finish = tonumber(ARGV[a + 2 + i]), tonumber(ARGV[a + 3 + i])
      if start <= now and now < finish then
        chosen = {key = KEYS[k + i], limit = tonumber(ARGV[a + 1]), finish = finish}
        table.insert(windows, start)
      end
    end
    if chosen == nil then
      return redis.error_reply('TOLLGATE_CLOCK_SKEW the caller clock is more than a period away from the store')
    end
    table.insert(checks, chosen)
    a, k = a + 6, k + 3
  end
end

local states, worst = judge(checks, tokens, micro, now)
if worst then
  return reply_no(worst, states)
end
take(checks, tokens, micro, now, retention)
local r = {s = 'open', t = tokens, m = micro, d = now + lease, dt = 0, dm = 0, w = windows}
save_record(id, r)
redis.call('ZADD', LEASES, r.d, id)
return reply_ok(r, states)
