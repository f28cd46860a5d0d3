"""The emulated device used by the GPU-pace benchmarks: timed passes that leave the CPU free."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from support.emulated_device import emulated_encoder


def test_a_pass_takes_its_set_time_and_leaves_the_gil_free(minilm_dir: Path) -> None:
    encoder = emulated_encoder(minilm_dir, pass_ms=50, token_us=0)
    ids = encoder.tokenize(["a text", "another, longer text"])
    spins = 0
    stop = threading.Event()

    def spin() -> None:  # Python work that only runs while the pass does not hold the GIL
        nonlocal spins
        while not stop.is_set():
            spins += 1

    thread = threading.Thread(target=spin)
    thread.start()
    started = time.perf_counter()
    encoder.encode(ids)
    took = time.perf_counter() - started
    stop.set()
    thread.join()
    log = encoder.backend.log  # type: ignore[attr-defined]
    assert took >= 0.05
    assert (log.passes, log.inputs, log.sizes) == (1, 2, [2])
    assert log.padded_tokens == 2 * max(len(row) for row in ids)
    assert log.busy_s >= 0.05
    assert spins > 1_000, "the CPU was free while the device worked"


def test_different_texts_get_different_vectors_in_order(minilm_dir: Path) -> None:
    encoder = emulated_encoder(minilm_dir, pass_ms=0)
    texts = ["first text", "second text", "third"]
    together = encoder.embed(texts)
    alone = np.stack([encoder.embed([text])[0] for text in texts])
    np.testing.assert_allclose(together, alone, atol=1e-6)
    assert float(together[0] @ together[2]) < 0.9999
    assert encoder.fingerprint.startswith("emulated-")
