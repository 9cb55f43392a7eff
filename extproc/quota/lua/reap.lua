-- reap(retention ms, limit)
-- Expire the leases that ran out (each into its `unknown` ledger record) and
-- forget old closed reservations, at most `limit` of each. Every sidecar
-- calls it now and then, so a dead sidecar's holds reach the ledger even
-- when no traffic comes.

local now = now_ms()
return sweep(now, tonumber(ARGV[1]), tonumber(ARGV[2]))
