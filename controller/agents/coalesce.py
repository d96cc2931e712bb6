"""Group commit for requests that each need a small write: requests that arrive while
a transaction is being written, or within a few milliseconds of each other, are
handled together by one call of ``handle`` (one transaction), in one worker thread.

Each request still gets its own outcome: ``handle`` returns one result per item, and
an item's result may be an exception, which is raised in that request only. When
``handle`` itself raises (the database refused the transaction), nothing of the batch
was stored; every item is then handled again on its own, so that one bad item fails
only its own request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# An idle worker thread ends after this long; the next request starts another.
IDLE_EXIT_S = 30.0


@dataclass
class _Pending(Generic[T, R]):
    item: T
    weight: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[R]
    arrived: float = field(default_factory=time.monotonic)


def _settle(future: asyncio.Future[R], outcome: R | BaseException) -> None:
    if future.done():  # the request went away (client disconnected, server stopping)
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class Coalescer(Generic[T, R]):
    """``await submit(item)`` from any event loop; ``handle(items)`` runs in the worker
    thread and returns one ``R`` or exception per item, in order.

    window_s: how long the oldest waiting item may wait for others to join it (0: no
      waiting; items still share a transaction when they arrive while one is written).
    max_weight: most total weight (e.g. heartbeats) in one batch; one item always fits.
    split_on_error: whether a failed batch of several items is retried item by item
      (not, for example, when the database is unreachable: every item would fail again).
    """

    def __init__(
        self,
        handle: Callable[[Sequence[T]], Sequence[R | Exception]],
        *,
        window_s: float = 0.002,
        max_weight: int = 1000,
        split_on_error: Callable[[Exception], bool] = lambda _exc: True,
        name: str = "coalescer",
    ) -> None:
        self._handle = handle
        self._window_s = window_s
        self._max_weight = max_weight
        self._split_on_error = split_on_error
        self._name = name
        self._cond = threading.Condition()
        self._queue: deque[_Pending[T, R]] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.batches = 0
        """Transactions (calls of ``handle``) so far, retries included."""

    async def submit(self, item: T, *, weight: int = 1) -> R:
        loop = asyncio.get_running_loop()
        pending: _Pending[T, R] = _Pending(item, weight, loop, loop.create_future())
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self._name} is closed")
            self._queue.append(pending)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            else:
                self._cond.notify()
        return await pending.future

    def close(self, timeout_s: float = 10.0) -> None:
        """Handle what is queued, then stop the worker thread."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join(timeout_s)

    def _take(self) -> list[_Pending[T, R]] | None:
        """The next batch, or None when the thread should end (idle or closed)."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    self._thread = None
                    return None
                if not self._cond.wait(IDLE_EXIT_S) and not self._queue:
                    self._thread = None
                    return None
            # Wait for company: until the oldest item has waited ``window_s`` or the
            # batch is full. Under load the oldest has waited that long already.
            deadline = self._queue[0].arrived + self._window_s
            while not self._closed and self._weight() < self._max_weight:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[_Pending[T, R]] = []
            weight = 0
            while self._queue and (not batch or weight + self._queue[0].weight <= self._max_weight):
                pending = self._queue.popleft()
                batch.append(pending)
                weight += pending.weight
            return batch

    def _weight(self) -> int:
        return sum(p.weight for p in self._queue)

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._process(batch)
            except BaseException as exc:  # never leave a request waiting forever
                for pending in batch:
                    with contextlib.suppress(RuntimeError):
                        pending.loop.call_soon_threadsafe(_settle, pending.future, exc)
                if not isinstance(exc, Exception):
                    with self._cond:
                        self._thread = None
                    raise

    def _process(self, batch: list[_Pending[T, R]]) -> None:
        self.batches += 1
        try:
            outcomes: Sequence[R | Exception] = self._handle([p.item for p in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} items")
        except Exception as exc:
            if len(batch) > 1 and self._split_on_error(exc):
                log.warning(
                    "%s: a batch of %d failed (%s); one by one", self._name, len(batch), exc
                )
                for pending in batch:
                    self._process([pending])
                return
            outcomes = [exc] * len(batch)
        for pending, outcome in zip(batch, outcomes, strict=True):
            # The loop is gone when its server stopped; nobody waits for the answer.
            with contextlib.suppress(RuntimeError):
                pending.loop.call_soon_threadsafe(_settle, pending.future, outcome)
