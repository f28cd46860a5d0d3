"""An emulated accelerator, to study how the server keeps a GPU busy on machines that have none.

:class:`EmulatedDevice` is an :class:`encoder.backend.Backend` whose forward pass takes a set time
per pass plus a set time per padded token, *sleeping* meanwhile: like a GPU, it leaves the CPU (and
the GIL) free while it works, so what the rest of the server does in that time (tokenising, planning
the next batch, answering) overlaps with the pass exactly as it would beside a real device. It keeps
what a profiler of a real device would show: passes, batch sizes, padded tokens and busy seconds, so
a benchmark can print the device's busy fraction of wall time.

The hidden state it returns is cheap but not constant: each position is a one-hot of its token id,
so different inputs get different vectors and a test can check that answers come back in order.

It lives in support/, which is not packaged: it can never be selected in production.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from encoder.model import Encoder
from encoder.model_files import read_model_spec

__all__ = ["DeviceLog", "EmulatedDevice", "emulated_encoder"]


@dataclass(slots=True)
class DeviceLog:
    """What the device did: a GPU profiler's view (passes, sizes, busy time)."""

    passes: int = 0
    inputs: int = 0
    padded_tokens: int = 0
    busy_s: float = 0.0
    sizes: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def busy_fraction(self) -> float:
        """Busy seconds over the wall time since the log was (re)started."""
        return self.busy_s / max(1e-9, time.perf_counter() - self.started)

    def restart(self) -> None:
        self.passes, self.inputs, self.padded_tokens, self.busy_s = 0, 0, 0, 0.0
        self.sizes = []
        self.started = time.perf_counter()


class EmulatedDevice:
    """A forward pass of ``pass_ms + token_us x padded tokens``, asleep (GIL released) meanwhile."""

    name = "emulated"

    def __init__(self, *, hidden: int, pass_ms: float = 10.0, token_us: float = 0.0) -> None:
        self.hidden = hidden
        self.pass_s = pass_ms / 1e3
        self.token_s = token_us / 1e6
        self.log = DeviceLog()
        self._lock = threading.Lock()  # one pass at a time, as on one device queue

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> torch.Tensor:
        batch, length = input_ids.shape
        seconds = self.pass_s + self.token_s * batch * length
        with self._lock:
            started = time.perf_counter()
            # One-hot of each token id (modulo the width): texts with other tokens get other vectors.
            # Built inside the pass's time (a GPU computes its output within the pass), then asleep
            # for the rest of it.
            slots = torch.from_numpy(input_ids % self.hidden).unsqueeze(-1)
            hidden = torch.zeros(batch, length, self.hidden).scatter_(2, slots, 1.0)
            time.sleep(max(0.0, seconds - (time.perf_counter() - started)))
            busy = time.perf_counter() - started
        log = self.log
        log.passes += 1
        log.inputs += batch
        log.padded_tokens += batch * length
        log.busy_s += busy
        log.sizes.append(batch)
        return hidden


def emulated_encoder(
    model_dir: str | Path,
    *,
    pass_ms: float = 10.0,
    token_us: float = 0.0,
    max_tokens: int | None = None,
    truncate: bool = True,
) -> Encoder:
    """An :class:`Encoder` with the folder's real tokenizer, pooling and limits on an emulated device.

    Its fingerprint is the folder's, tagged ``emulated``: its vectors never share cache keys with
    the real model's.
    """
    spec = read_model_spec(Path(model_dir))
    limit = min(spec.max_tokens, max_tokens or spec.max_tokens)
    tokenizer = AutoTokenizer.from_pretrained(str(spec.transformer_path))
    device = EmulatedDevice(hidden=spec.dim, pass_ms=pass_ms, token_us=token_us)
    return Encoder(
        model=None,
        tokenizer=tokenizer,
        spec=spec,
        device=torch.device("cpu"),
        dtype=torch.float32,
        max_tokens=limit,
        truncate=truncate,
        threads=1,
        fingerprint=f"emulated-{replace(spec, max_tokens=limit).fingerprint()}"[:24],
        backend=device,
        numerics=f"emulated:{pass_ms}ms+{token_us}us",
    )
