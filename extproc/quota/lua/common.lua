-- Shared by every quota script: redis_store.py puts this file in front of
-- each of the other scripts (reserve, top_up, settle, charge, reap) before
-- loading it.
--
-- KEYS[1] reservations (hash: id -> record), KEYS[2] open leases (zset:
-- id by deadline), KEYS[3] closed reservations (zset: id by close time),
-- KEYS[4] the usage ledger (stream), KEYS[5] request ids recorded in the
-- last day (zset by time, the ledger's dedupe); the keys after them belong to
-- the limits being checked. All keys share one hash tag, so the script is
-- legal on Redis Cluster.
--
-- The ledger is written here, in the same script as the budget change it
-- explains: a settle appends the request's record, and a lease that expires
-- appends the record its reserve carried (outcome unknown, amount = what it
-- charged). A crash between two round trips cannot make them disagree.
--
-- Units (the same as memory_store.py): bucket levels in 1/60000 token, so a
-- bucket of R tokens/min gains exactly R units per ms; money in micro-dollars;
-- time in ms from Redis TIME, never from the caller.

redis.replicate_commands()

local UNIT = 60000
local RES, LEASES, CLOSED, STREAM, SEEN = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local DAY_MS = 86400000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function num(n)
  return string.format('%.0f', n)
end

local function load_record(id)
  local raw = redis.call('HGET', RES, id)
  if not raw then
    return nil
  end
  local r = cjson.decode(raw)
  local windows = {}
  for i, w in ipairs(r.w) do
    windows[i] = tonumber(w)
  end
  return {s = r.s, t = tonumber(r.t), m = tonumber(r.m), d = tonumber(r.d),
          dt = tonumber(r.dt), dm = tonumber(r.dm), w = windows, l = r.l, x = r.x}
end

local function save_record(id, r)
  local windows = {}
  for i, w in ipairs(r.w) do
    windows[i] = num(w)
  end
  redis.call('HSET', RES, id, cjson.encode({s = r.s, t = num(r.t), m = num(r.m), d = num(r.d),
                                            dt = num(r.dt), dm = num(r.dm), w = windows, l = r.l, x = r.x}))
end

-- Append a usage record (flat field/value list) unless `id` was recorded in
-- the last day; returns the entry id, or false for a duplicate.
local function append_record(id, fields, now)
  redis.call('ZREMRANGEBYSCORE', SEEN, '-inf', now - DAY_MS)
  if redis.call('ZSCORE', SEEN, id) then
    return false
  end
  redis.call('ZADD', SEEN, now, id)
  return redis.call('XADD', STREAM, '*', unpack(fields))
end

-- The record a reserve carried (JSON of field/value pairs), as written when
-- its lease expires holding r.t tokens and r.m micro-dollars.
local function expired_fields(r)
  local f = cjson.decode(r.l)
  local input = 0
  for i = 1, #f, 2 do
    if f[i] == 'input_tokens' then
      input = tonumber(f[i + 1])
    end
  end
  for i = 1, #f, 2 do
    if f[i] == 'micro_usd' then
      f[i + 1] = num(r.m)
    elseif f[i] == 'output_tokens' then
      f[i + 1] = num(math.max(0, r.t - input))
    elseif f[i] == 'outcome' then
      f[i + 1] = 'unknown'
    end
  end
  return f
end

-- An open lease past its deadline turns into a charge of what it holds (which
-- is already deducted) and into its ledger record. Closed records are dropped
-- after the retention period.
local function expire(id, r, now)
  r.s = 'expired'
  if r.l then
    local entry = append_record(id, expired_fields(r), now)
    if entry then
      r.x = entry
    end
  end
  save_record(id, r)
  redis.call('ZREM', LEASES, id)
  redis.call('ZADD', CLOSED, now, id)
end

local function sweep(now, retention, limit)
  limit = limit or 64
  local due = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0, limit)
  local expired = 0
  for _, id in ipairs(due) do
    local r = load_record(id)
    if r and r.s == 'open' then
      expire(id, r, now)
      expired = expired + 1
    else
      redis.call('ZREM', LEASES, id)
    end
  end
  local old = redis.call('ZRANGEBYSCORE', CLOSED, '-inf', now - retention, 'LIMIT', 0, limit)
  for _, id in ipairs(old) do
    local r = load_record(id)
    if r and r.s ~= 'open' then
      redis.call('HDEL', RES, id)
    end
    redis.call('ZREM', CLOSED, id)
  end
  return expired
end

local function bucket_level(key, cap, rate, now)
  local v = redis.call('HMGET', key, 'l', 't')
  if not v[1] then
    return cap
  end
  local level, last = tonumber(v[1]), tonumber(v[2])
  if now > last then
    level = level + (now - last) * rate
  end
  if level > cap then
    level = cap
  end
  return level
end

local function fill_ms(units, rate)
  return math.ceil(units / rate)
end

local function bucket_store(key, level, cap, rate, now)
  redis.call('HSET', key, 'l', num(level), 't', num(now))
  local full_in = 0
  if level < cap then
    full_in = fill_ms(cap - level, rate)
  end
  redis.call('PEXPIRE', key, full_in + 60000)
end

-- Checks are tables: {b = true, key, cap, rate} for a token bucket (with
-- n = 1 for a request bucket: it takes one, whatever the tokens), or
-- {key, limit, finish} for a budget period ending at `finish`.
-- Returns the flat states (kind, limit, remaining, reset ms per check) and,
-- if some check refuses, the worst refusal {index, retry ms, never fits, requested}.
local function judge(checks, tokens, micro, now)
  local states, worst = {}, nil
  for i, c in ipairs(checks) do
    local refusal = nil
    if c.b then
      local amount = c.n or tokens
      local need = amount * UNIT
      local level = bucket_level(c.key, c.cap, c.rate, now)
      c.level = level
      if need <= level then
        level = level - need
      else
        local never = need > c.cap
        local wait = need - level
        if never then
          wait = c.cap - level
        end
        refusal = {i, fill_ms(wait, c.rate), never and 1 or 0, amount}
      end
      local reset = 0
      if level < c.cap then
        reset = fill_ms(c.cap - level, c.rate)
      end
      table.insert(states, {c.n and 'requests' or 'tokens', c.cap / UNIT, math.floor(level / UNIT), reset})
    else
      local spent = tonumber(redis.call('GET', c.key) or '0')
      local left = c.limit - spent
      if spent + micro <= c.limit then
        left = left - micro
      else
        refusal = {i, c.finish - now, 0, micro}
      end
      table.insert(states, {'money', c.limit, left, c.finish - now})
    end
    if refusal and (worst == nil or refusal[3] > worst[3]
                    or (refusal[3] == worst[3] and refusal[2] > worst[2])) then
      worst = refusal
    end
  end
  return states, worst
end

-- Take `tokens` and `micro` from every check (negative amounts give back).
local function take(checks, tokens, micro, now, retention)
  for _, c in ipairs(checks) do
    if c.b then
      local level = c.level
      if level == nil then
        level = bucket_level(c.key, c.cap, c.rate, now)
      end
      level = level - (c.n or tokens) * UNIT
      if level > c.cap then
        level = c.cap
      end
      bucket_store(c.key, level, c.cap, c.rate, now)
    else
      redis.call('INCRBY', c.key, num(micro))
      redis.call('PEXPIREAT', c.key, num(c.finish + retention + DAY_MS))
    end
  end
end

-- Checks from ARGV starting at `a` and KEYS starting at `k`: 'b' (or 'r' for
-- requests), burst, per_minute (one key) or 'm', limit, period end (one key).
local function parse_checks(n, a, k)
  local checks = {}
  for _ = 1, n do
    if ARGV[a] == 'b' or ARGV[a] == 'r' then
      table.insert(checks, {b = true, key = KEYS[k], cap = tonumber(ARGV[a + 1]) * UNIT,
                            rate = tonumber(ARGV[a + 2]), n = ARGV[a] == 'r' and 1 or nil})
      a = a + 3
    else
      table.insert(checks, {key = KEYS[k], limit = tonumber(ARGV[a + 1]), finish = tonumber(ARGV[a + 2])})
      a = a + 3
    end
    k = k + 1
  end
  return checks
end

local function reply_ok(r, states)
  return {'ok', r.d, r.t, r.m, r.w, states}
end

local function reply_no(worst, states)
  return {'no', worst[1], worst[2], worst[3], worst[4], states}
end

-- Budget checks that choose their period: 'm', limit, b0, b1, b2, b3 with
-- three keys (the previous, current and next calendar period as the caller's
-- clock sees them); the period that holds Redis TIME is the one charged.
-- Returns the checks and the chosen period starts, or nil on clock skew.
local function parse_new_checks(n, a, k, now)
  local checks, windows = {}, {}
  for _ = 1, n do
    if ARGV[a] == 'b' or ARGV[a] == 'r' then
      table.insert(checks, {b = true, key = KEYS[k], cap = tonumber(ARGV[a + 1]) * UNIT,
                            rate = tonumber(ARGV[a + 2]), n = ARGV[a] == 'r' and 1 or nil})
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
        return nil
      end
      table.insert(checks, chosen)
      a, k = a + 6, k + 3
    end
  end
  return checks, windows
end

-- The checks an existing hold was charged to, from a new request's
-- arguments (as parse_new_checks reads them): its token buckets, and for each
-- budget the period whose start the hold kept in `windows` (the one holding
-- `now` if the hold is older than the three periods offered). Request buckets
-- are left out: the hold's reserve already counted the request. nil on skew.
local function parse_held_checks(n, a, k, windows, now)
  local checks, j = {}, 1
  for _ = 1, n do
    if ARGV[a] == 'r' then
      a, k = a + 3, k + 1
    elseif ARGV[a] == 'b' then
      table.insert(checks, {b = true, key = KEYS[k], cap = tonumber(ARGV[a + 1]) * UNIT,
                            rate = tonumber(ARGV[a + 2])})
      a, k = a + 3, k + 1
    else
      local chosen, current = nil, nil
      for i = 0, 2 do
        local start, finish = tonumber(ARGV[a + 2 + i]), tonumber(ARGV[a + 3 + i])
        local c = {key = KEYS[k + i], limit = tonumber(ARGV[a + 1]), finish = finish}
        if start == windows[j] then
          chosen = c
        end
        if start <= now and now < finish then
          current = c
        end
      end
      chosen = chosen or current
      if chosen == nil then
        return nil
      end
      table.insert(checks, chosen)
      a, k, j = a + 6, k + 3, j + 1
    end
  end
  return checks
end

-- Close the hold `r` (open or expired) at what the request really used:
-- apply used - held to `checks` (the hold's own buckets and periods), replace
-- the `unknown` record an expiry wrote by `record` ('' for none) and mark it
-- settled. Returns the outcome ('settled', or 'late' after an expiry) and
-- the differences applied.
local function close_hold(id, r, checks, tokens, micro, record, now, retention)
  if r.s == 'open' and r.d <= now then
    expire(id, r, now)
  end
  local outcome = 'settled'
  if r.s == 'expired' then
    outcome = 'late'
  end
  local dt, dm = tokens - r.t, micro - r.m
  take(checks, dt, dm, now, retention)
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
  return outcome, dt, dm
end

local function skew()
  return redis.error_reply('TOLLGATE_CLOCK_SKEW the caller clock is more than a period away from the store')
end
