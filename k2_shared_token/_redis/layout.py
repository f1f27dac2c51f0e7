"""What this package keeps in Redis, and the Lua scripts that change it.

For a namespace ``N`` (see :func:`k2_shared_token._core.settings.namespace_for`) and prefix ``k2``::

    k2:{N}:token   string  <fence>:<digest>:<json>, PX = remaining token lifetime
    k2:{N}:lock    string  random owner id of the refreshing worker, PX = lock lease
    k2:{N}:fence   integer incremented on every lock acquisition (no expiry)
    k2:{N}:backoff string  <error code>:<credentials fingerprint or empty>, PX = fleet hold-off
    k2:{N}:failures integer consecutive failed exchanges, PX = hold-off + 10 min (the streak)
    k2:{N}:server  string  what the fleet learned of K2's server (``reuse``, ``revoke``, comma
                           separated), PX = 30 days
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
    backoff: str
    failures: str
    channel: str
    server: str

    @classmethod
    def for_namespace(cls, prefix: str, namespace: str) -> Keys:
        base = f"{prefix}:{{{namespace}}}"
        return cls(
            f"{base}:token",
            f"{base}:lock",
            f"{base}:fence",
            f"{base}:backoff",
            f"{base}:failures",
            f"{base}:ready",
            f"{base}:server",
        )

    @property
    def all(self) -> tuple[str, ...]:
        """Every key (not the channel), e.g. for a test that scans what we store."""
        return (self.token, self.lock, self.fence, self.backoff, self.failures, self.server)


_READ_CACHED = """
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' then v = '!wrongtype' end
"""

# Add a trait of K2's server to the namespace's list (comma separated, each once); the list
# lives 30 days past the last time something was learned or a token confirmed it.
_LEARN = """
local function learn(key, trait)
  local s = redis.pcall('GET', key)
  if type(s) ~= 'string' then s = '' end
  if not string.find(',' .. s .. ',', ',' .. trait .. ',', 1, true) then
    s = (s == '' and trait) or (s .. ',' .. trait)
  end
  redis.call('SET', key, s, 'PX', 2592000000)
  return s
end
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
local server = redis.pcall('GET', KEYS[6])
if type(server) ~= 'string' then server = '' end
local revoke = string.find(',' .. server .. ',', ',revoke,', 1, true) ~= nil
-- Under revoke-previous, the token is not good enough while a holder exchanges: K2 kills it as
-- it issues the next one.
local replacing = revoke and redis.call('PTTL', KEYS[2]) ~= -2
if ours and tonumber(ARGV[3]) >= 0 and ttl > tonumber(ARGV[3]) and not replacing then
  return {2, 0, v, ttl, '', server}
end
local b = redis.pcall('GET', KEYS[4])
if type(b) == 'string' then
  local left = redis.call('PTTL', KEYS[4])
  local code, fp = string.match(b, '^([%w_]+):(%x*)$')
  if left < 0 then
    redis.call('DEL', KEYS[4])  -- our hold-offs always expire: this one is not ours
  elseif code and (fp == '' or fp == ARGV[4]) then
    return {3, left, v, ttl, code, server}
  end
end
-- Our locks always expire: one without a TTL (or of another type) is not ours and would block
-- the namespace for good.
if redis.call('PTTL', KEYS[2]) == -1 then redis.call('DEL', KEYS[2]) end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local fence = redis.pcall('INCR', KEYS[3])
  -- Lua counts in doubles: past 2^53 the fence would no longer compare equal to itself as
  -- written back. Only a foreign value gets there; start again.
  if type(fence) ~= 'number' or fence < 1 or fence > 9007199254740991 then
    redis.call('SET', KEYS[3], 1)
    fence = 1
  end
  -- Ours never expires: a foreign TTL would void our publish. SET drops it (no extra command
  -- for the ACL rule to allow).
  if redis.call('PTTL', KEYS[3]) >= 0 then redis.call('SET', KEYS[3], fence) end
  local streak = redis.pcall('GET', KEYS[5])
  if type(streak) ~= 'string' then streak = '0' end
  -- K2 revokes the previous token on issue: every process stops handing it out now, and waits
  -- for the new one, rather than send it while the exchange kills it.
  if revoke then redis.call('PUBLISH', ARGV[5], 'X') end
  return {1, fence, v, ttl, streak, server}
end
return {0, redis.call('PTTL', KEYS[2]), v, ttl, '', server}
"""
)
"""Take the refresh lock unless the token is good enough or the fleet is holding off K2.

KEYS: token, lock, fence, backoff, failures, server. ARGV: owner, lease_ms, min_ttl_ms
(negative: always try the lock), credentials fingerprint, channel (an acquisition is
announced as ``X`` when the server is known to revoke the previous token). Returns
``{outcome, number, value or nil, token_pttl, extra, server}`` (``server``: what the fleet
learned of K2's server):

- 1, acquired: ``number`` is this holder's fencing number, ``extra`` the count of consecutive
  failed exchanges before it (the holder's next hold-off grows with it);
- 0, another worker holds the lock: ``number`` is its remaining lease, which is how long a
  waiter waits before trying to take over from a holder that may have died;
- 2, the token (in our format) has more than min_ttl_ms left: lock untouched;
- 3, the fleet is holding off K2 after a failed exchange: ``extra`` is the error code and
  ``number`` the hold-off left (ms). A credentials hold-off recorded for another secret is
  ignored, so a rotated secret is tried at once.
"""

PUBLISH = (
    _LEARN
    + """
local newest = redis.pcall('GET', KEYS[3])
local written = 0
if newest == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  redis.call('DEL', KEYS[4], KEYS[5])
  redis.call('PUBLISH', ARGV[5], 'T' .. ARGV[4] .. ':' .. ARGV[3])
  if ARGV[6] ~= '' then learn(KEYS[6], ARGV[6]) end
  written = 1
end
if redis.pcall('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return written
"""
)
"""Write a freshly exchanged token, wake every waiter, release the lock: one round trip.

KEYS: token, lock, fence, backoff, failures, server. ARGV: owner, fence, value, ttl_ms, channel,
what was learned of the server ('' for nothing new; kept 30 days past the last token). The
write happens only if no later lock holder exists (the fence is still the newest), so a holder
that stalled past its lease cannot replace a newer token with its older one. A written token ends
any hold-off and failure streak. The lock is deleted only by its owner. Returns 1 if the token
was written.
"""

RELEASE = """
if redis.pcall('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
  if type(redis.pcall('INCR', KEYS[3])) ~= 'number' then redis.call('SET', KEYS[3], 1) end
  redis.call('PEXPIRE', KEYS[3], ARGV[5] + 600000)
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""
"""Give the lock back without a token, telling waiters why so they need not wait out the lease.

KEYS: lock, backoff, failures. ARGV: owner, channel, announcement, hold-off value
(``<code>:<fingerprint>``, '' for none), hold-off ms. Only the owner may release, and only the
owner records a hold-off: a holder that stalled past its lease reports nothing.
"""

LEARN = (
    _LEARN
    + """
return learn(KEYS[1], ARGV[1])
"""
)
"""Record what the fleet learned of K2's server (a trait such as ``revoke``), kept with the
others. KEYS: server. ARGV: the trait. Returns every trait known."""

INVALIDATE = (
    _READ_CACHED
    + """
if not v then return 0 end
if string.match(v, '^%d+:(%x+):') ~= ARGV[1] then return 2 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], 'D' .. ARGV[1])
if redis.call('PTTL', KEYS[2]) ~= -2 then return 3 end
return 1
"""
)
"""Delete the token only if it is still the one the caller saw fail.

KEYS: token, lock. ARGV: digest of the failed token, channel. Many workers that see the same
401 therefore cause one refresh, not a loop of deletions of each other's fresh tokens. Returns
1 when it deleted, 3 when it deleted while a lock holder is exchanging (its new token is on the
way), 2 when another token is shared (the failed one was replaced), 0 when none is. A deletion is
announced (``D<digest>``), so every process drops its copy at once (the fleet backplane).
"""
