"""What this package keeps in Redis, and the Lua scripts that change it.

For a namespace ``N`` (see :func:`k2_shared_token.settings.namespace_for`) and prefix ``k2``::

    k2:{N}:token   string  <fence>:<digest>:<json>, PX = remaining token lifetime
    k2:{N}:lock    string  random owner id of the refreshing worker, PX = lock lease
    k2:{N}:fence   integer incremented on every lock acquisition (no expiry)
    k2:{N}:ready   pub/sub channel: a written token, or the lock holder's failure

``{N}`` is a Redis Cluster hash tag, so every key of a namespace lives in one slot and each
script below touches a single slot. The scripts are the only writers; each is one round trip
and atomic, which is what makes "check, then act" safe across a fleet.

Every script reads the token key with ``redis.pcall``: a value of another Redis type (someone
else's hash under our name) reads as the marker ``!wrongtype`` and is then handled like any
other unreadable value — a miss that the next write overwrites.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    token: str
    lock: str
    fence: str
    channel: str

    @classmethod
    def for_namespace(cls, prefix: str, namespace: str) -> Keys:
        base = f"{prefix}:{{{namespace}}}"
        return cls(f"{base}:token", f"{base}:lock", f"{base}:fence", f"{base}:ready")


_READ_CACHED = """
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' then v = '!wrongtype' end
"""

READ = (
    _READ_CACHED
    + """
return {v, redis.call('PTTL', KEYS[1]), redis.call('PTTL', KEYS[2])}
"""
)
"""Read the token, its remaining lifetime and the lock's, in one round trip.

KEYS: token, lock. Returns ``{value or nil, token_pttl, lock_pttl}``. The PTTLs come from Redis's
clock, so every pod agrees on the expiry whatever its own clock says. A waiter uses the lock's
PTTL to notice that the holder finished before the waiter subscribed.
"""

TRY_LOCK = (
    _READ_CACHED
    + """
local ttl = redis.call('PTTL', KEYS[1])
local ours = v and string.match(v, '^%d+:%x+:') ~= nil
if ours and tonumber(ARGV[3]) >= 0 and ttl > tonumber(ARGV[3]) then return {2, 0, v, ttl} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('INCR', KEYS[3]), v, ttl}
end
return {0, redis.call('PTTL', KEYS[2]), v, ttl}
"""
)
"""Take the refresh lock unless the token is already good enough, and re-read the token.

KEYS: token, lock, fence. ARGV: owner, lease_ms, min_ttl_ms (negative: always try the lock).
Returns ``{outcome, number, value or nil, token_pttl}``. Outcome 1: acquired, and ``number`` is
this holder's fencing number. Outcome 0: another worker holds the lock, and ``number`` is its
remaining lease, which is how long a waiter waits before trying to take over from a holder that
may have died. Outcome 2: the token (in our format) has more than min_ttl_ms left; lock untouched.
"""

PUBLISH = """
local newest = redis.call('GET', KEYS[3])
local written = 0
if newest == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  redis.call('PUBLISH', ARGV[5], 'T' .. ARGV[4] .. ':' .. ARGV[3])
  written = 1
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return written
"""
"""Write a freshly exchanged token, wake every waiter, release the lock: one round trip.

KEYS: token, lock, fence. ARGV: owner, fence, value, ttl_ms, channel. The write happens only if
no later lock holder exists (the fence is still the newest), so a holder that stalled past its
lease cannot replace a newer token with its older one. The lock is deleted only by its owner.
Returns 1 if the token was written.
"""

RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return 1
"""
"""Give the lock back without a token, telling waiters why so they need not wait out the lease.

KEYS: lock. ARGV: owner, channel, announcement ('' for none). Only the owner may release.
"""

INVALIDATE = (
    _READ_CACHED
    + """
if not v or string.match(v, '^%d+:(%x+):') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""
)
"""Delete the token only if it is still the one the caller saw fail.

KEYS: token. ARGV: digest of the failed token. Many workers that see the same 401 therefore
cause one refresh, not a loop of deletions of each other's fresh tokens.
"""
