"""collector_paused: the cyclic GC is off inside, and back as it was after the last
caller leaves, nested or from several threads."""

from __future__ import annotations

import gc
import threading

import pytest

from controller.kit.collector import collector_paused


def test_paused_inside_and_restored_after() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer caller is still inside
    assert gc.isenabled()


def test_restored_on_error_and_as_a_decorator() -> None:
    @collector_paused()
    def fails() -> None:
        assert not gc.isenabled()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fails()
    assert gc.isenabled()


def test_a_collector_disabled_before_stays_disabled() -> None:
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_threads_leave_it_enabled() -> None:
    inside, release = threading.Barrier(2), threading.Event()

    def hold() -> None:
        with collector_paused():
            inside.wait()
            release.wait(5)

    other = threading.Thread(target=hold)
    other.start()
    with collector_paused():
        inside.wait()
    assert not gc.isenabled()  # the other thread is still inside
    release.set()
    other.join()
    assert gc.isenabled()
