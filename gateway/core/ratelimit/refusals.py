"""The two refusals that no wait cures, worded for the person who must fix them.

A 429 says "come back later"; these say "this can never pass as it is": a request of more tokens
than its key may use in a whole minute (a 400 naming the limit, so the client splits it), and a
configuration whose limits could not be enforced (``EMBED_WORKERS > 1`` without Redis: the CLI
refuses to start, with a line saying what to set).
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.core.errors import InvalidInputError
from gateway.core.keys import ApiKey
from gateway.settings import ENV_PREFIX, Settings

__all__ = ["over_tokens_limit", "unshared_limits_problem"]


def over_tokens_limit(name: str | None, limit: int, tokens: str) -> InvalidInputError:
    """The 400 for a request of more ``tokens`` (a count, or "more than N") than key ``name`` may use
    in a minute: no wait would let it through, so it is no 429."""
    return InvalidInputError(
        f"This request holds {tokens} tokens, more than key '{name}' may use in a minute "
        f"(tokens per min (TPM): Limit {limit}); split it into requests of at most {limit} tokens.",
        param="input",
        code="request_too_large",
    )


def unshared_limits_problem(settings: Settings, keys: Sequence[ApiKey]) -> str | None:
    """Why these settings cannot enforce the keys' limits, as one line, or None.

    ``EMBED_WORKERS > 1`` runs that many HTTP worker processes; without Redis each would keep its
    own buckets and admit a key's whole limit, so every limit would be multiplied by the workers.
    """
    if settings.workers <= 1 or settings.redis_url.strip() or not any(key.limited for key in keys):
        return None
    return (
        f"{ENV_PREFIX}WORKERS (--workers): {settings.workers} workers without {ENV_PREFIX}REDIS_URL would each "
        f"keep their own rate-limit buckets, so every key's limits in {ENV_PREFIX}API_KEYS_FILE would be "
        f"multiplied by {settings.workers}; set {ENV_PREFIX}REDIS_URL (the workers then share the buckets) "
        f"or {ENV_PREFIX}WORKERS=1"
    )
