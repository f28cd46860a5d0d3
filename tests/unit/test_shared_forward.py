"""The shared forward thread (several models on one device): passes of the models take turns."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest

from encoder.shared_forward import SharedForward


def test_a_pass_of_another_model_runs_right_after_the_pass_in_flight() -> None:
    shared = SharedForward()
    bulk, small = shared.lane(), shared.lane()
    started = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def first() -> None:
        order.append("bulk 0")
        started.set()
        release.wait(5)

    try:
        running = bulk.submit(first)
        assert started.wait(5)
        queued = [bulk.submit(order.append, f"bulk {i}") for i in (1, 2, 3)]  # the bulk model's next passes
        mine = small.submit(order.append, "small")
        release.set()
        for future in [running, *queued, mine]:
            future.result(5)
        assert order == ["bulk 0", "small", "bulk 1", "bulk 2", "bulk 3"]
    finally:
        release.set()
        shared.shutdown()


def test_errors_reach_the_caller_and_a_lane_cancels_only_its_own_passes() -> None:
    shared = SharedForward()
    one, other = shared.lane(), shared.lane()
    gate, running = threading.Event(), threading.Event()

    def block() -> bool:
        running.set()
        return gate.wait(5)

    try:
        blocker = one.submit(block)
        assert running.wait(5)
        mine = one.submit(str, 1)
        theirs = other.submit(str, 2)
        one.shutdown(cancel_futures=True)  # the model stops: its queued pass is dropped, not the other's
        gate.set()
        assert blocker.result(5) is True
        with pytest.raises(CancelledError):
            mine.result(5)
        assert theirs.result(5) == "2"
        with pytest.raises(ZeroDivisionError):
            other.submit(lambda: 1 / 0).result(5)
    finally:
        gate.set()
        shared.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        other.submit(str, 3)
