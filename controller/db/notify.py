"""Wake-ups at commit time, across processes: Postgres ``NOTIFY``/``LISTEN``.

:func:`send` queues a notification in the caller's transaction: Postgres delivers it when
that transaction commits and drops it when it rolls back, so a listener never hears of
a change it cannot read yet ("rows first, actions second", with no after-commit hook).
Why Postgres rather than a Redis pub/sub: the change lives in Postgres, so the
notification rides the very commit that makes it visible (a Redis message would be sent
after the commit, and lost with a crash between the two), and it needs nothing the
controller does not have already (Redis is optional).

A :class:`Listener` is one thread and one connection per process and channel, however
many requests wait: each waiter subscribes to a key (the payload it cares about) and is
woken, in its own event loop, when a notification with that payload arrives. While the
listener's connection is down (or on SQLite, which has no ``LISTEN``) ``listening`` is
false and waiters fall back to checking for themselves; when it drops, every waiter is
woken to do so."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import threading
from collections.abc import Callable
from functools import partial

import psycopg
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

# How often the listener thread looks at its stop flag while no notification comes.
_TICK_S = 1.0
_RETRY_S = 2.0


def send(session: Session, channel: str, payload: str) -> None:
    """Notify ``channel`` with ``payload`` when the session's transaction commits
    (nothing on SQLite: its waiters check for themselves)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_notify(channel, payload)))


class Subscription:
    """One waiter's wake-up, set from the listener's thread into the waiter's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the waiter's loop has closed
            self._loop.call_soon_threadsafe(self._event.set)

    async def wait(self, timeout_s: float) -> bool:
        """True when woken within ``timeout_s`` (and ready for the next wake-up)."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout_s)
        except TimeoutError:
            return False
        self._event.clear()
        return True


class Listener:
    def __init__(self, database_url: str, channel: str) -> None:
        if not channel.isidentifier():
            raise ValueError(f"not a channel name: {channel!r}")
        self.channel = channel
        self._conninfo = make_url(database_url).set(drivername="postgresql").render_as_string(False)
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Subscription]] = {}
        self._stop = threading.Event()
        self.listening = False
        # For tests and logs: notifications received.
        self.received = 0
        self._thread = threading.Thread(
            target=self._run, name=f"edgefleet-listen-{channel}", daemon=True
        )
        self._thread.start()

    def subscribe(self, key: str) -> Subscription:
        sub = Subscription(asyncio.get_running_loop())
        with self._lock:
            self._waiters.setdefault(key, set()).add(sub)
        return sub

    def unsubscribe(self, key: str, sub: Subscription) -> None:
        with self._lock:
            subs = self._waiters.get(key)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._waiters[key]

    def _wake(self, select_keys: Callable[[str], bool]) -> None:
        with self._lock:
            subs = [s for k, group in self._waiters.items() if select_keys(k) for s in group]
        for sub in subs:
            sub.wake()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(f'LISTEN "{self.channel}"')
                    self.listening = True
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=_TICK_S):
                            self.received += 1
                            self._wake(partial(operator.eq, note.payload))
            except psycopg.Error as exc:
                if not self._stop.is_set():
                    log.warning("listening on %s: %s; retrying", self.channel, exc)
            finally:
                if self.listening:
                    self.listening = False
                    self._wake(lambda _key: True)  # check for themselves meanwhile
            self._stop.wait(_RETRY_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(_TICK_S + 5)


_listeners: dict[tuple[str, str], Listener] = {}
_listeners_lock = threading.Lock()


def listener(database_url: str, channel: str) -> Listener | None:
    """This process's listener of ``channel`` on the database, started at first use;
    None on a database without ``LISTEN`` (SQLite)."""
    if make_url(database_url).get_backend_name() != "postgresql":
        return None
    with _listeners_lock:
        found = _listeners.get((database_url, channel))
        if found is None:
            found = _listeners[(database_url, channel)] = Listener(database_url, channel)
        return found


def stop_listeners() -> None:
    with _listeners_lock:
        stopping = list(_listeners.values())
        _listeners.clear()
    for each in stopping:
        each.stop()
