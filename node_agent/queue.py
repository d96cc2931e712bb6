"""The agent's durable state: the heartbeat sequence counter and the outbox of
heartbeats not yet acknowledged, in one SQLite file (WAL) under the state directory.

Every heartbeat goes through the outbox, online or not: allocating its sequence number
and storing it is one transaction, so a crash between building and sending loses
nothing, and numbers never repeat across restarts. The outbox is bounded; when full,
the oldest heartbeats go first (the newest say most about the node now) and are
counted. Entries leave only when the controller acknowledges a sequence number at or
above theirs.

``synchronous=NORMAL`` in WAL mode survives a crash of the agent; a power cut may lose
the last transaction. The worst case is a sequence number handed out twice, which the
controller then ignores as a replay once, and the controller's ``last_seq`` (returned
with every acknowledgement) moves the counter past it. An fsync every interval on an
SD card is the price that trade avoids."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS beats (seq INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Entry:
    seq: int
    body: str


class HeartbeatQueue:
    def __init__(self, path: Path, *, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.path = path
        self.max_entries = max_entries
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE) below.
        # One agent thread uses it at a time, but not necessarily the one that opened it.
        self._db = sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _get(self, key: str, default: int = 0) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row is not None else default

    def _set(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def append(self, build: Callable[[int], str]) -> int:
        """Allocate the next sequence number, store ``build(seq)`` under it and drop the
        oldest entries beyond the bound, all in one transaction. Returns the number."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            seq = self._get("next_seq", 1)
            db.execute("INSERT INTO beats (seq, body) VALUES (?, ?)", (seq, build(seq)))
            self._set("next_seq", seq + 1)
            excess = self._count() - self.max_entries
            if excess > 0:
                db.execute(
                    "DELETE FROM beats WHERE seq IN (SELECT seq FROM beats ORDER BY seq LIMIT ?)",
                    (excess,),
                )
                self._set("dropped", self._get("dropped") + excess)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return seq

    def peek(self, limit: int) -> list[Entry]:
        """The oldest ``limit`` entries, in sequence order."""
        rows = self._db.execute("SELECT seq, body FROM beats ORDER BY seq LIMIT ?", (limit,))
        return [Entry(int(seq), body) for seq, body in rows]

    def ack(self, last_seq: int) -> int:
        """The controller holds everything up to ``last_seq``: forget it. Also moves the
        counter above it (the controller may know more than a node whose state was lost
        or rolled back). Returns how many entries left."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            removed = db.execute("DELETE FROM beats WHERE seq <= ?", (last_seq,)).rowcount
            if self._get("next_seq", 1) <= last_seq:
                self._set("next_seq", last_seq + 1)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return int(removed)

    def discard(self, up_to_seq: int) -> int:
        """Drop entries the controller will never take (counted as dropped)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            removed = int(db.execute("DELETE FROM beats WHERE seq <= ?", (up_to_seq,)).rowcount)
            self._set("dropped", self._get("dropped") + removed)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return removed

    def _count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM beats").fetchone()[0])

    def __len__(self) -> int:
        return self._count()

    @property
    def next_seq(self) -> int:
        return self._get("next_seq", 1)

    @property
    def dropped(self) -> int:
        """Heartbeats dropped unsent since the state directory was created."""
        return self._get("dropped")

    def get_setting(self, key: str) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (f"x:{key}",)).fetchone()
        return int(row[0]) if row is not None else None

    def put_setting(self, key: str, value: int) -> None:
        self._set(f"x:{key}", value)
