-- ledger_append(request id, dedupe ms, field, value, ...)
-- KEYS[1] the usage stream, KEYS[2] recently recorded request ids (zset by
-- time). A request id seen within the dedupe window is not recorded again,
-- so a retried append cannot count a request twice.

redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[2], now, ARGV[1])
local fields = {}
for i = 3, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('XADD', KEYS[1], '*', unpack(fields))
return 1
