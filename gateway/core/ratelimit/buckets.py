"""A key's two token buckets, computed twice: in Redis (one Lua script) and in one process.

Both do the same arithmetic: refill since the last call (``limit / 60`` a second, never above the
limit), check what the call needs, and take it only if it is there. The script runs it atomically on
Redis' own clock, so every replica sees one bucket, and also takes the usage a replica settles
(whatever the check says); :class:`LocalBuckets` runs it on this process's monotonic clock, for a
server without Redis and for the seconds after Redis failed. They sit side by side on purpose: a
change to one must be made to the other.
"""

from __future__ import annotations

import time

from gateway.core.ratelimit.levels import WINDOW_S

__all__ = ["BUCKETS_SCRIPT", "LocalBuckets"]

# KEYS: requests bucket, tokens bucket. ARGV: 1-2 requests and tokens limits (0: none); 3-4 requests
# and tokens to take; 5-6 requests and tokens the buckets must hold for the take (0: no check);
# 7-8 requests and tokens to settle (usage a replica took locally: taken before the check, whatever
# it says); 9-10 the requests and tokens levels a bucket that Redis holds no state for starts from
# (the replica's last known level, so a Redis restart without persistence refills nothing; '': full).
# A negative take or settle gives back, never above the limit. Returns {admitted, blocked (0, 1
# requests, 2 tokens), requests level, tokens level}, the levels as strings (Lua numbers would be cut
# to integers).
BUCKETS_SCRIPT = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local function level(key, limit, start)
  if limit <= 0 then return 0 end
  local state = redis.call('HMGET', key, 'level', 'at')
  local value = tonumber(state[1]) or math.min(limit, tonumber(start) or limit)
  local at = tonumber(state[2]) or now
  return math.min(limit, value + math.max(0, now - at) * limit / 60)
end
local rl, tl = tonumber(ARGV[1]), tonumber(ARGV[2])
local rv, tv = level(KEYS[1], rl, ARGV[9]), level(KEYS[2], tl, ARGV[10])
if rl > 0 then rv = math.min(rl, rv - tonumber(ARGV[7])) end
if tl > 0 then tv = math.min(tl, tv - tonumber(ARGV[8])) end
local need_r, need_t = tonumber(ARGV[5]), tonumber(ARGV[6])
local blocked = 0
if rl > 0 and need_r > 0 and rv < need_r then blocked = 1
elseif tl > 0 and need_t > 0 and tv < need_t then blocked = 2 end
if blocked == 0 then
  if rl > 0 then rv = math.min(rl, rv - tonumber(ARGV[3])) end
  if tl > 0 then tv = math.min(tl, tv - tonumber(ARGV[4])) end
end
if rl > 0 then
  redis.call('HSET', KEYS[1], 'level', tostring(rv), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[1], 120 + math.ceil(math.max(0, -rv) * 60 / rl))
end
if tl > 0 then
  redis.call('HSET', KEYS[2], 'level', tostring(tv), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[2], 120 + math.ceil(math.max(0, -tv) * 60 / tl))
end
return {blocked == 0 and 1 or 0, blocked, tostring(rv), tostring(tv)}
"""


class LocalBuckets:
    """The same arithmetic as the Lua script, for one process."""

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}

    def _level(self, bucket: str, limit: int, now: float) -> float:
        value, at = self._state.get(bucket, (float(limit), now))
        return min(float(limit), value + max(0.0, now - at) * limit / WINDOW_S)

    def run(
        self, name: str, rl: int, tl: int, take: tuple[int, int], need: tuple[float, float]
    ) -> tuple[int, float, float]:
        now = time.monotonic()
        rv = self._level(f"{name}:r", rl, now) if rl else 0.0
        tv = self._level(f"{name}:t", tl, now) if tl else 0.0
        blocked = 0
        if rl and need[0] and rv < need[0]:
            blocked = 1
        elif tl and need[1] and tv < need[1]:
            blocked = 2
        if not blocked:
            rv = min(float(rl), rv - take[0]) if rl else 0.0
            tv = min(float(tl), tv - take[1]) if tl else 0.0
        if rl:
            self._state[f"{name}:r"] = (rv, now)
        if tl:
            self._state[f"{name}:t"] = (tv, now)
        return blocked, rv, tv

    def levels(self, name: str, rl: int, tl: int, now: float) -> tuple[float, float] | None:
        """The key's levels now, or None when this process never decided for it."""
        if f"{name}:r" not in self._state and f"{name}:t" not in self._state:
            return None
        return (self._level(f"{name}:r", rl, now) if rl else 0.0, self._level(f"{name}:t", tl, now) if tl else 0.0)

    def seed(self, name: str, limits: tuple[int, int], levels: tuple[float, float], now: float) -> None:
        """Set a key's levels (what Redis said last) before this process decides alone."""
        (rl, tl), (rv, tv) = limits, levels
        if rl:
            self._state[f"{name}:r"] = (rv, now)
        if tl:
            self._state[f"{name}:t"] = (tv, now)
