"""One forward thread for several models on one device, taking their passes in turns.

Several models in one process (``EMBED_MODELS_FILE``) must not run passes at once on one device:
they would fight over the same cores (on the CPU, each thread that runs torch gets a libgomp team of
its own, and more team threads than cores make every barrier sleep) or the same GPU. So their
micro-batchers share one thread. A plain one-thread executor would run passes first come, first
served: a bulk request for one model keeps two passes handed over (the one running, the next one
planned behind it), and a small request for another model would queue behind both. Here each model
has its own lane (:meth:`SharedForward.lane`, an :class:`~concurrent.futures.Executor` the batcher
uses as its own), and the thread takes the lanes in turns: a pass handed over by one model runs
right after the pass in flight, whatever the others have queued.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

__all__ = ["SharedForward"]

P = ParamSpec("P")
T = TypeVar("T")

_Job = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class SharedForward:
    """The thread and its lanes (see the module's docstring). :meth:`shutdown` stops the thread."""

    def __init__(self, name: str = "encoder-forward") -> None:
        self._lanes: list[deque[_Job]] = []
        self._ready = threading.Condition()
        self._turn = 0  # the lane to look at first for the next pass
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def lane(self) -> _Lane:
        """An executor for one model's passes (its micro-batcher's ``forward``)."""
        with self._ready:
            self._lanes.append(deque())
            return _Lane(self, len(self._lanes) - 1)

    def _submit(self, lane: int, job: _Job) -> None:
        with self._ready:
            if self._closed:
                raise RuntimeError("the shared forward thread is shut down")
            self._lanes[lane].append(job)
            self._ready.notify()

    def _cancel(self, lane: int) -> None:
        with self._ready:
            queued = list(self._lanes[lane])
            self._lanes[lane].clear()
        for future, *_ in queued:
            future.cancel()

    def _next(self) -> _Job | None:
        """The next job, lanes in turns; None once shut down and empty."""
        with self._ready:
            while True:
                count = len(self._lanes)
                for step in range(count):
                    index = (self._turn + step) % count
                    if self._lanes[index]:
                        self._turn = (index + 1) % count
                        return self._lanes[index].popleft()
                if self._closed:
                    return None
                self._ready.wait()

    def _run(self) -> None:
        while (job := self._next()) is not None:
            future, function, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = function(*args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, *, cancel_futures: bool = True) -> None:
        """Cancel what is queued (by default), let the pass in flight end, and stop the thread."""
        with self._ready:
            self._closed = True
            lanes = list(range(len(self._lanes)))
            self._ready.notify_all()
        if cancel_futures:
            for lane in lanes:
                self._cancel(lane)
        self._thread.join()


class _Lane(Executor):
    """One model's way onto the shared thread: ``submit`` queues in this lane; ``shutdown`` cancels
    this lane's queued passes (the thread serves the other models on)."""

    def __init__(self, owner: SharedForward, index: int) -> None:
        self._owner = owner
        self._index = index

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        self._owner._submit(self._index, (future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            self._owner._cancel(self._index)
