"""Per-key token buckets for requests and tokens per minute, shared by every replica through Redis.

A bucket holds up to ``limit`` units and refills at ``limit / 60`` per second. A request of a key
with limits is admitted in two steps:

1. **admission** (the API-key middleware, before the body is read): it takes one request from the
   requests bucket, and is refused while that bucket holds less than one request or the tokens
   bucket less than one token (a key in debt waits for the debt to refill: no work is done for it);
2. **reservation** (:meth:`RateLimiter.reserve`, once the request's token count is known: the
   cached inputs' counts come with the cache lookup, the others from the tokenizer, so before the
   encoder does any work): it takes the request's tokens only if the tokens bucket holds them all,
   else the request is refused (429, with the wait until the bucket holds them). A request of more
   tokens than the key's whole limit could never pass, so it is refused with a plain 400 by the
   caller instead of a 429 that no wait cures. Reserved tokens stay taken when the client hangs up
   (the work was queued for it); the caller gives them back only when the server failed the request.

So concurrent requests of one key cannot all pass on an empty ledger: each one's tokens are taken
before the next one is checked, atomically in Redis or in this process.

With Redis (the cache's mode: one node, Sentinel's master, or a Cluster, where both buckets of a
key sit in one slot through a hash tag), one Lua script reads, refills, checks and takes a key's
buckets atomically with Redis' own clock: two replicas see one bucket. Without Redis each process
keeps its own buckets, so ``EMBED_WORKERS > 1`` without Redis is refused at start
(:func:`unshared_limits_problem`): every worker would multiply each limit.

A Redis round trip per request would cost the hit path more than everything else it does, so each
replica keeps, per key, the levels Redis answered last (its *view*) and what it took since:

* **far** from the limits (the view, less this replica's own unsettled usage and this request, keeps
  more than ``near`` = 20% of both limits, the view is at most ``4 x settle_s`` = 0.2 s old, and
  the unsettled usage, this request included, stays within ``unsettled`` = 5% of each limit) it
  admits and reserves locally; a background task settles every key's usage with Redis every
  ``settle_s`` = 50 ms (one pipeline of script calls) and reads the new levels back;
* **near** a limit (or with a stale view, or a full unsettled share) every admission and
  reservation is one awaited script call that settles the key's unsettled usage first, so the
  first request past a limit is refused, whichever replica gets it.

The bound: Redis checks exactly, so what the replicas serve exceeds a key's limit (plus what
refilled) only by usage that was unsettled somewhere when Redis said yes: at most the unsettled
share of each replica, which never holds a request larger than 5% of the limit. With requests of
at least 5% of the limit that is at most one request per replica; with smaller ones it is at most
5% of the limit per replica, and only when the other replicas took more than the 20% margin within
the 0.2 s a view lives. (Each process is a replica here: ``EMBED_WORKERS`` workers count one each.)

When Redis fails (an error, or no answer within ``timeout_s``; waiting for one of the
``max_connections`` connections is not timed, so a burst of clients is no failure) this process
falls back to its own buckets for ``retry_s``, and they start from the views: each key's last known
levels, refilled since, less what this replica took without Redis' word (unsettled, or in a call
that failed). A key in debt stays in debt through a Redis hiccup. What this process takes meanwhile,
and what it held unsettled, is kept per key as *owed* and settled with Redis (by the next settling
round, or the key's next call) once Redis answers again, so an outage does not hand each key its
limit again once per replica. Usage in a call that timed out is not sent again (a paused Redis runs
the call when it resumes); a request whose admission timed out is so counted twice at most.

A bucket that Redis holds no state for (a restart without persistence) starts from the level this
replica last knew (its view refilled since, or its own bucket), passed with every call, not full:
a restart does not refill every key's minute. Keys this replica never saw start full.

The package, one responsibility a module:

* :mod:`~gateway.core.ratelimit.limiter` - :class:`RateLimiter`: admission, reservation, settling;
* :mod:`~gateway.core.ratelimit.views` - a replica's views of the keys and the usage it owes;
* :mod:`~gateway.core.ratelimit.buckets` - the bucket arithmetic, in Lua for Redis and in Python;
* :mod:`~gateway.core.ratelimit.levels` - :class:`Levels` and :class:`Admission`, what a call answers;
* :mod:`~gateway.core.ratelimit.refusals` - the 400 and the start-up refusal that no wait cures.
"""

from __future__ import annotations

from gateway.core.ratelimit.levels import Admission, Levels, format_reset
from gateway.core.ratelimit.limiter import RateLimiter
from gateway.core.ratelimit.refusals import over_tokens_limit, unshared_limits_problem

__all__ = ["Admission", "Levels", "RateLimiter", "format_reset", "over_tokens_limit", "unshared_limits_problem"]
