"""The coalescer behind the heartbeat endpoint: requests arriving together share one
call (one transaction), each still gets its own outcome, and a failed batch fails only
the request it failed for."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from controller.agents import coalesce
from controller.agents.coalesce import Coalescer


class Recorder:
    """A handle that records its batches; ``fail_on`` items make the whole batch raise,
    ``refuse`` items get an exception of their own."""

    def __init__(
        self, *, fail_on: frozenset[str] = frozenset(), refuse: frozenset[str] = frozenset()
    ) -> None:
        self.batches: list[list[str]] = []
        self.fail_on = fail_on
        self.refuse = refuse
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def __call__(self, items: Sequence[str]) -> list[str | Exception]:
        self.batches.append(list(items))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail_on & set(items):
            raise RuntimeError(f"cannot store {sorted(self.fail_on & set(items))}")
        return [ValueError(f"refused {i}") if i in self.refuse else i.upper() for i in items]


def gather(c: Coalescer[str, str], items: Sequence[str]) -> list[str | BaseException]:
    async def run() -> list[str | BaseException]:
        return await asyncio.gather(*(c.submit(i) for i in items), return_exceptions=True)

    return asyncio.run(run())


@pytest.fixture
def make() -> Iterator[Callable[..., Coalescer[str, str]]]:
    made: list[Coalescer[str, str]] = []

    def factory(handle: Recorder, **kw: Any) -> Coalescer[str, str]:
        c: Coalescer[str, str] = Coalescer(handle, **kw)
        made.append(c)
        return c

    yield factory
    for c in made:
        c.close()


def test_items_arriving_together_share_one_call(make: Callable[..., Coalescer[str, str]]) -> None:
    handle = Recorder()
    c = make(handle, window_s=0.2)
    items = [f"n{i}" for i in range(10)]
    assert gather(c, items) == [i.upper() for i in items]
    assert handle.batches == [items]  # one transaction, in arrival order
    assert c.batches == 1


def test_each_item_gets_its_own_outcome(make: Callable[..., Coalescer[str, str]]) -> None:
    handle = Recorder(refuse=frozenset({"b", "d"}))
    got = gather(make(handle, window_s=0.2), ["a", "b", "c", "d"])
    assert got[0] == "A"
    assert got[2] == "C"
    assert isinstance(got[1], ValueError)
    assert str(got[1]) == "refused b"
    assert isinstance(got[3], ValueError)
    assert str(got[3]) == "refused d"
    assert len(handle.batches) == 1


def test_a_failed_batch_is_retried_item_by_item(make: Callable[..., Coalescer[str, str]]) -> None:
    handle = Recorder(fail_on=frozenset({"bad"}))
    got = gather(make(handle, window_s=0.2), ["a", "bad", "c"])
    assert got[0] == "A"
    assert got[2] == "C"
    assert isinstance(got[1], RuntimeError)
    assert "bad" in str(got[1])
    assert handle.batches == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]


def test_no_retry_when_retrying_cannot_help(make: Callable[..., Coalescer[str, str]]) -> None:
    handle = Recorder(fail_on=frozenset({"bad"}))
    got = gather(make(handle, window_s=0.2, split_on_error=lambda _e: False), ["a", "bad"])
    assert all(isinstance(g, RuntimeError) for g in got)
    assert handle.batches == [["a", "bad"]]


def test_arrivals_during_a_transaction_form_the_next_batch(
    make: Callable[..., Coalescer[str, str]],
) -> None:
    """With no waiting window at all, batching still happens under load: what arrives
    while one transaction is written goes into the next one together."""
    handle = Recorder()
    handle.gate = threading.Event()
    c = make(handle, window_s=0.0)

    async def run() -> list[str]:
        first = asyncio.ensure_future(c.submit("first"))
        assert await asyncio.to_thread(handle.entered.wait, 5)  # "first" is being written
        rest = [asyncio.ensure_future(c.submit(f"n{i}")) for i in range(5)]
        deadline = time.monotonic() + 5
        while len(c._queue) < 5:  # all five queued behind it
            assert time.monotonic() < deadline, "the submissions did not queue"
            await asyncio.sleep(0)
        assert handle.gate is not None
        handle.gate.set()
        return [await first, *[await r for r in rest]]

    assert asyncio.run(run()) == ["FIRST", "N0", "N1", "N2", "N3", "N4"]
    assert handle.batches == [["first"], ["n0", "n1", "n2", "n3", "n4"]]


def test_a_batch_holds_at_most_max_weight(make: Callable[..., Coalescer[str, str]]) -> None:
    handle = Recorder()
    c = make(handle, window_s=0.2, max_weight=5)

    async def run() -> list[str]:
        jobs = [c.submit(f"n{i}", weight=2) for i in range(5)] + [c.submit("big", weight=50)]
        return await asyncio.gather(*jobs)

    assert asyncio.run(run()) == ["N0", "N1", "N2", "N3", "N4", "BIG"]
    assert handle.batches == [["n0", "n1"], ["n2", "n3"], ["n4"], ["big"]]


def test_callers_on_different_event_loops(make: Callable[..., Coalescer[str, str]]) -> None:
    handle = Recorder()
    c = make(handle, window_s=0.05)
    results: dict[str, str] = {}

    def caller(name: str) -> None:
        results[name] = asyncio.run(c.submit(name))

    threads = [threading.Thread(target=caller, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {f"t{i}": f"T{i}" for i in range(4)}


def test_an_idle_worker_ends_and_comes_back(
    make: Callable[..., Coalescer[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coalesce, "IDLE_EXIT_S", 0.05)
    c = make(Recorder(), window_s=0.0)
    assert gather(c, ["a"]) == ["A"]
    deadline = time.monotonic() + 5
    while c._thread is not None:
        assert time.monotonic() < deadline, "the idle worker thread did not end"
        time.sleep(0.01)
    assert gather(c, ["b"]) == ["B"]


def test_closed(make: Callable[..., Coalescer[str, str]]) -> None:
    c = make(Recorder())
    assert gather(c, ["a"]) == ["A"]
    c.close()
    (got,) = gather(c, ["b"])
    assert isinstance(got, RuntimeError)
