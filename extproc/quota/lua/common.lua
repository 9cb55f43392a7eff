-- Shared by every quota script: redis_store.py puts this file in front of
-- each of reserve.lua, top_up.lua and settle.lua before loading it.
--
-- KEYS[1] reservations (hash: id -> record), KEYS[2] open leases (zset:
-- id by deadline), KEYS[3] closed reservations (zset: id by close time);
-- the keys after them belong to the limits being checked. All keys share one
-- hash tag, so the script is legal on Redis Cluster.
--
-- Units (the same as memory_store.py): bucket levels in 1/60000 token, so a
-- bucket of R tokens/min gains exactly R units per ms; money in micro-dollars;
-- time in ms from Redis TIME, never from the caller.

redis.replicate_commands()

local UNIT = 60000
local RES, LEASES, CLOSED = KEYS[1], KEYS[2], KEYS[3]
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
          dt = tonumber(r.dt), dm = tonumber(r.dm), w = windows}
end

local function save_record(id, r)
  local windows = {}
  for i, w in ipairs(r.w) do
    windows[i] = num(w)
  end
  redis.call('HSET', RES, id, cjson.encode({s = r.s, t = num(r.t), m = num(r.m), d = num(r.d),
                                            dt = num(r.dt), dm = num(r.dm), w = windows}))
end

-- An open lease past its deadline turns into a charge of what it holds (which
-- is already deducted): only its state changes. Closed records are dropped
-- after the retention period.
local function expire(id, r, now)
  r.s = 'expired'
  save_record(id, r)
  redis.call('ZREM', LEASES, id)
  redis.call('ZADD', CLOSED, now, id)
end

local function sweep(now, retention)
  local due = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0, 64)
  for _, id in ipairs(due) do
    local r = load_record(id)
    if r and r.s == 'open' then
      expire(id, r, now)
    else
      redis.call('ZREM', LEASES, id)
    end
  end
  local old = redis.call('ZRANGEBYSCORE', CLOSED, '-inf', now - retention, 'LIMIT', 0, 64)
  for _, id in ipairs(old) do
    local r = load_record(id)
    if r and r.s ~= 'open' then
      redis.call('HDEL', RES, id)
    end
    redis.call('ZREM', CLOSED, id)
  end
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

-- Checks are tables: {b = true, key, cap, rate} for a token bucket, or
-- {key, limit, finish} for a budget period ending at `finish`.
-- Returns the flat states (kind, limit, remaining, reset ms per check) and,
-- if some check refuses, the worst refusal {index, retry ms, never fits, requested}.
local function judge(checks, tokens, micro, now)
  local states, worst = {}, nil
  local need = tokens * UNIT
  for i, c in ipairs(checks) do
    local refusal = nil
    if c.b then
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
        refusal = {i, fill_ms(wait, c.rate), never and 1 or 0, tokens}
      end
      local reset = 0
      if level < c.cap then
        reset = fill_ms(c.cap - level, c.rate)
      end
      table.insert(states, {'tokens', c.cap / UNIT, math.floor(level / UNIT), reset})
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
      level = level - tokens * UNIT
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

-- Checks from ARGV starting at `a` and KEYS starting at `k`: 'b', burst,
-- per_minute (one key) or 'm', limit, period end (one key).
local function parse_checks(n, a, k)
  local checks = {}
  for _ = 1, n do
    if ARGV[a] == 'b' then
      table.insert(checks, {b = true, key = KEYS[k], cap = tonumber(ARGV[a + 1]) * UNIT,
                            rate = tonumber(ARGV[a + 2])})
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
