"""What one replica knows of each key's buckets between its Redis calls, and what it still owes.

A Redis round trip per request would cost the hit path more than everything else it does, so the
rate limiter keeps, per key, the levels Redis answered last (a :class:`View`) and the usage it took
on its own since; while Redis fails it keeps what it took without Redis' word as :class:`Owed`. This
module is that bookkeeping, as :class:`ReplicaViews`, the base of
:class:`~gateway.core.ratelimit.limiter.RateLimiter`:

* :meth:`ReplicaViews._far` decides whether a key is far enough from its limits to be admitted here;
* :meth:`ReplicaViews._carry`, :meth:`ReplicaViews._unsent` and :meth:`ReplicaViews._owe` move usage
  between "taken here", "on its way to Redis" and "owed";
* :meth:`ReplicaViews._starts` gives Redis the level to start a bucket from when it holds none;
* :meth:`ReplicaViews._failed` turns every view into local buckets when Redis fails.

The limiter's calls to Redis (and its settling rounds) live in
:mod:`~gateway.core.ratelimit.limiter`; the bound these rules give is in the package's docstring.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from gateway.core.ratelimit.buckets import LocalBuckets
from gateway.core.ratelimit.levels import WINDOW_S

__all__ = ["Owed", "ReplicaViews", "View"]

# Named as the module was before it became a package: log lines read as before.
logger = logging.getLogger("gateway.core.ratelimit")


@dataclass(slots=True)
class View:
    """One key's buckets as Redis answered them last, and what this replica took since."""

    requests_limit: int  # 0: none
    tokens_limit: int
    requests: float
    tokens: float
    at: float  # time.monotonic() of that answer
    pending_requests: int = 0  # taken here, not yet sent to Redis
    pending_tokens: int = 0
    sending_requests: int = 0  # on their way to Redis in a call that has not answered yet
    sending_tokens: int = 0


@dataclass(slots=True)
class Owed:
    """What this process took for one key without Redis' word (Redis failing), still to be settled."""

    requests_limit: int
    tokens_limit: int
    requests: int = 0
    tokens: int = 0


class ReplicaViews:
    """The views and owed usage of :class:`~gateway.core.ratelimit.limiter.RateLimiter` (which sets
    every attribute below in its ``__init__``), and the rules that move usage between them."""

    retry_s: float
    near: float
    unsettled: float
    fresh_s: float
    _local: LocalBuckets
    _down_until: float
    _views: dict[str, View]
    _owed: dict[str, Owed]

    def _failed(self, exc: BaseException) -> None:
        """Decide alone for ``retry_s``, starting from what Redis said last: a key in debt stays in debt.
        What the views held unsettled is owed to Redis, settled once it answers again."""
        now = time.monotonic()
        already = now < self._down_until  # another call in flight failed first: say it once
        self._down_until = now + self.retry_s
        for name, view in self._views.items():
            rl, tl = view.requests_limit, view.tokens_limit
            age = max(0.0, now - view.at)
            owed = self._owed.get(name)
            owed_requests, owed_tokens = (owed.requests, owed.tokens) if owed is not None else (0, 0)
            # Usage on its way in a call that failed may or may not have reached Redis: count it.
            rv = min(rl, view.requests + age * rl / WINDOW_S) - view.sending_requests - view.pending_requests
            tv = min(tl, view.tokens + age * tl / WINDOW_S) - view.sending_tokens - view.pending_tokens
            self._local.seed(name, (rl, tl), (rv - owed_requests, tv - owed_tokens), now)
            self._owe(name, rl, tl, view.pending_requests, view.pending_tokens)
            view.pending_requests = view.pending_tokens = 0
        self._views.clear()
        if not already:
            logger.warning("rate limits fall back to this process for %.0f s: redis failed: %r", self.retry_s, exc)

    def _owe(self, name: str, rl: int, tl: int, requests: int, tokens: int) -> None:
        """Keep ``requests`` and ``tokens`` taken without Redis' word, to settle once it answers."""
        requests, tokens = requests if rl else 0, tokens if tl else 0
        if not requests and not tokens:
            return
        owed = self._owed.get(name)
        if owed is None:
            self._owed[name] = Owed(rl, tl, requests, tokens)
            return
        owed.requests_limit, owed.tokens_limit = rl, tl
        owed.requests += requests
        owed.tokens += tokens

    def _carry(self, name: str, view: View | None) -> tuple[int, int]:
        """Take ``name``'s unsettled usage (the view's and what is owed) for one call to settle."""
        requests = tokens = 0
        if view is not None:
            requests, tokens = view.pending_requests, view.pending_tokens
            view.pending_requests = view.pending_tokens = 0
        owed = self._owed.pop(name, None)
        if owed is not None:
            requests += owed.requests
            tokens += owed.tokens
        if view is not None:
            view.sending_requests += requests
            view.sending_tokens += tokens
        return requests, tokens

    def _unsent(self, name: str, view: View | None, limits: tuple[int, int], usage: tuple[int, int]) -> None:
        """Usage a call carried that did not reach Redis: the next call or round settles it."""
        if view is not None and self._views.get(name) is view:
            view.pending_requests += usage[0]
            view.pending_tokens += usage[1]
        else:
            self._owe(name, *limits, *usage)

    def _starts(
        self, name: str, limits: tuple[int, int], view: View | None, usage: tuple[int, int]
    ) -> tuple[float | str, float | str]:
        """The levels a bucket that Redis holds no state for (a restart without persistence) starts
        from: this replica's view refilled since, or its own bucket before the ``usage`` this call
        settles; '' (full) when it knows nothing of the key."""
        (rl, tl), now = limits, time.monotonic()
        if view is not None and (view.requests_limit, view.tokens_limit) == (rl, tl):
            age = max(0.0, now - view.at)
            rv, tv = view.requests + age * rl / WINDOW_S, view.tokens + age * tl / WINDOW_S
        else:
            local = self._local.levels(name, rl, tl, now)
            if local is None:
                return "", ""
            rv, tv = local[0] + usage[0], local[1] + usage[1]
        return (min(float(rl), rv) if rl else "", min(float(tl), tv) if tl else "")

    def _far(
        self, view: View, rl: int, tl: int, *, requests: int, tokens: int, now: float
    ) -> tuple[float, float] | None:
        """The key's levels after taking ``requests`` and ``tokens`` here, or None when Redis must decide."""
        age = now - view.at
        if age > self.fresh_s or not self.unsettled:  # stale, or every admission asks Redis
            return None
        rv = tv = 0.0
        if rl:
            pending = view.pending_requests + requests
            rv = min(rl, view.requests + age * rl / WINDOW_S) - view.sending_requests - pending
            # Usage on its way to Redis (a settling call in flight) is still unsettled: counted too.
            if rv < self.near * rl or view.sending_requests + pending > self.unsettled * rl:
                return None
        if tl:
            pending = view.pending_tokens + tokens
            tv = min(tl, view.tokens + age * tl / WINDOW_S) - view.sending_tokens - pending
            if tv < self.near * tl or view.sending_tokens + pending > self.unsettled * tl:
                return None
        return rv, tv

    def _seen(self, name: str, rl: int, tl: int, rv: float, tv: float) -> None:
        view = self._views.get(name)
        if view is None or (view.requests_limit, view.tokens_limit) != (rl, tl):
            self._views[name] = View(rl, tl, rv, tv, time.monotonic())
        else:
            view.requests, view.tokens, view.at = rv, tv, time.monotonic()
