"""What a call to a key's buckets answers: its levels, whether it was admitted, and how long to wait.

:class:`Levels` and :class:`Admission` are what the HTTP layer turns into OpenAI's pacing headers
(``x-ratelimit-remaining-*``, ``x-ratelimit-reset-*``) and a 429's ``Retry-After``;
:func:`format_reset` writes a wait the way OpenAI's (Go's) durations read. Nothing here talks to
Redis: it is the arithmetic of a bucket that holds up to ``limit`` units and refills at
``limit / WINDOW_S`` per second.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

__all__ = ["BLOCKED", "WINDOW_S", "Admission", "Levels", "format_reset"]

WINDOW_S = 60.0  # limits are per minute


def format_reset(seconds: float) -> str:
    """OpenAI's (Go's) duration text: ``"17ms"``, ``"1s"``, ``"1.5s"``, ``"6m0s"``, ``"1h2m3s"``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{round(secs, 3):.3f}".rstrip("0").rstrip(".") + "s"
    if hours >= 1:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes >= 1:
        return f"{int(minutes)}m{text}"
    return text


class Levels(NamedTuple):
    """A key's two buckets after a call (a limit of None: that bucket does not exist).

    Named tuples, not frozen dataclasses, for this and :class:`Admission`: the hit path builds both
    per request of a limited key, and a frozen dataclass sets each field through ``object.__setattr__``
    (2.5 us for the pair against 0.8 us).
    """

    requests_limit: int | None
    tokens_limit: int | None
    requests: float
    tokens: float

    def remaining_requests(self) -> int:
        return max(0, math.floor(self.requests))

    def remaining_tokens(self) -> int:
        return max(0, math.floor(self.tokens))

    def reset_requests(self) -> float:
        """Seconds until the requests bucket is full again."""
        limit = self.requests_limit
        return (limit - self.requests) * WINDOW_S / limit if limit else 0.0

    def reset_tokens(self) -> float:
        limit = self.tokens_limit
        return (limit - self.tokens) * WINDOW_S / limit if limit else 0.0


class Admission(NamedTuple):
    admitted: bool
    blocked: Literal["requests", "tokens"] | None
    levels: Levels
    need: float = 1.0  # tokens the tokens bucket had to hold: 1 at admission, the request's count at reservation

    @property
    def retry_after(self) -> float:
        """Seconds until the blocking bucket holds what was asked of it."""
        levels = self.levels
        if self.blocked == "requests" and levels.requests_limit:
            return max(0.0, 1 - levels.requests) * WINDOW_S / levels.requests_limit
        if self.blocked == "tokens" and levels.tokens_limit:
            return max(0.0, self.need - levels.tokens) * WINDOW_S / levels.tokens_limit + 0.001
        return 0.0


BLOCKED: dict[int, Literal["requests", "tokens"] | None] = {0: None, 1: "requests", 2: "tokens"}
