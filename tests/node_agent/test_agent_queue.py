from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from node_agent.queue import HeartbeatQueue


def body(seq: int) -> str:
    return f'{{"seq": {seq}}}'


def test_sequence_numbers_increase_and_survive_a_restart(tmp_path: Path) -> None:
    q = HeartbeatQueue(tmp_path / "q.db", max_entries=10)
    assert [q.append(body) for _ in range(3)] == [1, 2, 3]
    q.ack(3)
    assert len(q) == 0
    q.close()
    q = HeartbeatQueue(tmp_path / "q.db", max_entries=10)
    assert q.append(body) == 4  # not reused, even with the outbox empty
    assert [(e.seq, e.body) for e in q.peek(10)] == [(4, body(4))]
    q.close()


def test_wal_mode(tmp_path: Path) -> None:
    HeartbeatQueue(tmp_path / "q.db", max_entries=1).close()
    with sqlite3.connect(tmp_path / "q.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_full_outbox_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    q = HeartbeatQueue(tmp_path / "q.db", max_entries=5)
    for _ in range(8):
        q.append(body)
    assert [e.seq for e in q.peek(100)] == [4, 5, 6, 7, 8]
    assert q.dropped == 3
    q.close()
    assert HeartbeatQueue(tmp_path / "q.db", max_entries=5).dropped == 3


def test_peek_is_in_order_and_ack_trims_a_prefix(tmp_path: Path) -> None:
    q = HeartbeatQueue(tmp_path / "q.db", max_entries=100)
    for _ in range(10):
        q.append(body)
    assert [e.seq for e in q.peek(4)] == [1, 2, 3, 4]
    assert q.ack(4) == 4
    assert [e.seq for e in q.peek(3)] == [5, 6, 7]
    assert q.ack(2) == 0  # an old acknowledgement changes nothing
    assert len(q) == 6


def test_ack_beyond_the_counter_moves_it(tmp_path: Path) -> None:
    """The controller knows a higher seq (the state directory was replaced)."""
    q = HeartbeatQueue(tmp_path / "q.db", max_entries=100)
    q.append(body)
    q.ack(500)
    assert q.next_seq == 501
    assert q.append(body) == 501


def test_discard_counts_as_dropped(tmp_path: Path) -> None:
    q = HeartbeatQueue(tmp_path / "q.db", max_entries=100)
    for _ in range(3):
        q.append(body)
    assert q.discard(1) == 1
    assert (q.dropped, [e.seq for e in q.peek(9)]) == (1, [2, 3])


def test_a_failing_build_allocates_nothing(tmp_path: Path) -> None:
    q = HeartbeatQueue(tmp_path / "q.db", max_entries=100)

    def broken(seq: int) -> str:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        q.append(broken)
    assert q.append(body) == 1
    assert len(q) == 1


def test_settings_round_trip(tmp_path: Path) -> None:
    q = HeartbeatQueue(tmp_path / "q.db", max_entries=1)
    assert q.get_setting("interval_ms") is None
    q.put_setting("interval_ms", 30_000)
    assert q.get_setting("interval_ms") == 30_000
