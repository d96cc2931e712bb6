"""Named fault points for crash tests, in the manner of etcd's gofail: a call
``faults.point("rollout.wave.started")`` at a decision boundary of the controller, which
does nothing unless the environment variable ``EDGEFLEET_FAULTS`` arms it, and then makes
the process stop there, raise or hang. A test kills a real worker or API process exactly
at such a boundary and checks, from the event log and the clusters' objects, that nothing
was lost, half-written or done twice.

Off by default and free when off: the variable is parsed once, at import, into a dict,
and :func:`point` tests that dict's truthiness (a few tens of ns per call).

``EDGEFLEET_FAULTS`` is a comma-separated list of ``name=[N*]action``:

    EDGEFLEET_FAULTS="rollout.wave.started=2*kill,registry.validate.probed=raise"

Actions:

- ``kill``: SIGKILL to the process's own process group: the whole process (a Celery
  worker's prefork master and its pool children alike) dies as by ``kill -9`` of its pod,
  with no cleanup, no rollback sent, no message acknowledged.
- ``exit``: ``os._exit(137)`` of this process only (a prefork pool's master survives,
  replaces the child and hands it the task again: use ``kill`` to take a worker down).
- ``raise``: :class:`FaultInjected` (an ordinary exception: the transaction rolls back).
- ``hang``: sleep until the process is killed (a probe or a deadline must notice).

``N*`` fires from the N-th hit of the point in the process on (default: the first), so
``2*kill`` passes the first hit and kills at the second (wave 1's start, say). Before it
acts, a fault writes ``edgefleet fault point NAME: ACTION (hit N)`` to stderr, unbuffered,
so a test can tell from the process's log where it died. An unknown point name or action
stops the process at import with :class:`FaultSpecError`, so a typo never leaves a test
believing it injected a fault it did not (and ``Settings`` refuses any armed fault in
production). :data:`POINTS` lists every point and where it sits; tests/test_faults.py
checks it against the calls in the source.

Points, in the order a rollout meets them (``(c)`` marks a point after the commit):

  apply (controller/manifests/service.py, controller/rollouts/service.py: apply_rollout)
    manifests.apply.validated   every document validated, nothing written yet
    manifests.apply.document    after each document is written and flushed (N*: the N-th)
    rollout.apply.claimed       rollout, waves and node claims flushed, no Applied event
    rollout.apply.committed     (c) the apply committed, its first reconcile not sent
  commands: pause, resume, abort, undo, retry (controller/rollouts/commands.py: command)
    rollout.command.locked      the rollout row locked, nothing changed
    rollout.command.recorded    the transition recorded (flushed), no step sent, no commit
  reconcile step (controller/rollouts/reconciler.py reconcile, and the step's modules
  waves.py, step.py, convergence.py)
    rollout.step.locked         the rollout row locked and its rows read, nothing changed
    rollout.started             Pending -> Progressing recorded, not committed
    rollout.wave.started        WaveStarted recorded (the wave Applying), no node admitted
    rollout.nodes.admitted      nodes moved to Applying, nothing sent to the clusters
    rollout.nodes.pushed        the clusters told to run the new version, nothing recorded
    rollout.observed            clusters observed, Running/Failed recorded, not committed
    rollout.gate.evaluated      the gate decided (pass, hold, fail), decision not applied
    rollout.wave.promoted       GatePassed recorded, the next wave current, not committed
    rollout.succeeded           -> Succeeded recorded, not committed
    rollout.failed              -> Failed recorded (gate, deadline), onFailure not acted on
    rollout.rolling_back        -> RolledBack recorded, nothing reverted on the clusters
    rollout.revert.pushed       revert (rollback, abort, undo): the clusters told to run
                                the previous versions, nothing recorded
    rollout.revert.recorded     revert: nodes recorded Reverting, and RolledBack where
                                seen back, not committed
    rollout.converge.pushed     a Succeeded rollout's nodes back from offline: the
                                clusters told to run their version, nothing recorded
    rollout.step.committed      (c) the step committed, its follow-up step not sent
  heartbeat ingest (controller/fleet/service.py, controller/agents/service.py)
    fleet.heartbeat.folded      in-process agents' heartbeats folded, not committed
    agents.heartbeat.folded     POST /v1/agents/heartbeat folded and written, not committed
  registry (controller/registry/service.py: push_version, run_validation)
    registry.push.staged        artifact staged and hashed, no row written
    registry.push.before_promote  version row and event flushed, artifact not in the store
    registry.validate.claimed   (c) Validating committed, the probe not started
    registry.validate.probed    the probe's verdict in hand, not recorded
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from controller.kit.transactions import after_commit

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

ENV = "EDGEFLEET_FAULTS"
EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL (128 + 9)

POINTS: dict[str, str] = {
    "manifests.apply.validated": "controller/manifests/service.py _apply_all",
    "manifests.apply.document": "controller/manifests/service.py _apply_all",
    "rollout.apply.claimed": "controller/rollouts/service.py apply_rollout",
    "rollout.apply.committed": "controller/rollouts/service.py apply_rollout",
    "rollout.command.locked": "controller/rollouts/commands.py command",
    "rollout.command.recorded": "controller/rollouts/commands.py command",
    "rollout.step.locked": "controller/rollouts/reconciler.py reconcile",
    "rollout.step.committed": "controller/rollouts/reconciler.py reconcile",
    "rollout.started": "controller/rollouts/reconciler.py reconcile",
    "rollout.wave.started": "controller/rollouts/waves.py Step.progress",
    "rollout.nodes.admitted": "controller/rollouts/waves.py Step.progress",
    "rollout.nodes.pushed": "controller/rollouts/waves.py Step.progress",
    "rollout.observed": "controller/rollouts/waves.py Step.progress",
    "rollout.gate.evaluated": "controller/rollouts/waves.py Step.judge",
    "rollout.wave.promoted": "controller/rollouts/waves.py Step.promote",
    "rollout.succeeded": "controller/rollouts/waves.py Step.promote",
    "rollout.failed": "controller/rollouts/waves.py Step.fail",
    "rollout.rolling_back": "controller/rollouts/waves.py Step.fail",
    "rollout.revert.pushed": "controller/rollouts/step.py StepBase.revert",
    "rollout.revert.recorded": "controller/rollouts/step.py StepBase.revert",
    "rollout.converge.pushed": "controller/rollouts/convergence.py Convergence.converge",
    "fleet.heartbeat.folded": "controller/fleet/service.py ingest_heartbeats",
    "agents.heartbeat.folded": "controller/agents/service.py receive_heartbeats",
    "registry.push.staged": "controller/registry/service.py push_version",
    "registry.push.before_promote": "controller/registry/service.py push_version",
    "registry.validate.claimed": "controller/registry/service.py run_validation",
    "registry.validate.probed": "controller/registry/service.py run_validation",
}
ACTIONS = ("kill", "exit", "raise", "hang")


class FaultSpecError(ValueError):
    """``EDGEFLEET_FAULTS`` names a point or an action that does not exist."""


class FaultInjected(RuntimeError):
    """Raised by a point armed with ``raise``."""

    def __init__(self, name: str) -> None:
        super().__init__(f"fault injected at {name}")
        self.point = name


@dataclass
class Fault:
    action: str
    from_hit: int = 1
    hits: Iterator[int] = field(default_factory=lambda: itertools.count(1))


def parse(spec: str) -> dict[str, Fault]:
    """``name=[N*]action,...`` into armed faults; raises FaultSpecError naming the
    problem (and the known points, for a misspelt one)."""
    armed: dict[str, Fault] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, sep, term = (s.strip() for s in item.partition("="))
        if not sep or not term:
            raise FaultSpecError(f"{ENV}: {item!r} is not name=[N*]action")
        if name not in POINTS:
            raise FaultSpecError(
                f"{ENV}: unknown fault point {name!r}; known points: {', '.join(sorted(POINTS))}"
            )
        count, _, action = term.partition("*") if "*" in term else ("1", "", term)
        if action not in ACTIONS:
            raise FaultSpecError(
                f"{ENV}: unknown action {action!r} for {name}; actions: {', '.join(ACTIONS)}"
            )
        if not count.strip().isdigit() or int(count) < 1:
            raise FaultSpecError(f"{ENV}: {term!r}: the hit count before * must be 1 or more")
        armed[name] = Fault(action, int(count))
    return armed


_armed: dict[str, Fault] = parse(os.environ.get(ENV, ""))


def point(name: str) -> None:
    """A named fault point (listed in POINTS): nothing unless EDGEFLEET_FAULTS arms it."""
    if _armed:
        _hit(name)


def on_commit(session: Session, name: str) -> None:
    """A fault point that fires once ``session``'s transaction has committed, before the
    work registered after this call (sending the next task) runs."""
    if _armed and name in _armed:
        after_commit(session, lambda: _hit(name))


def _hit(name: str) -> None:
    fault = _armed.get(name)
    if fault is None:
        return
    hit = next(fault.hits)
    if hit < fault.from_hit:
        return
    os.write(2, f"edgefleet fault point {name}: {fault.action} (hit {hit})\n".encode())
    if fault.action == "kill":
        os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)  # not reached: the group holds this process
    if fault.action == "exit":
        os._exit(EXIT_CODE)
    if fault.action == "hang":
        while True:
            time.sleep(3600)
    raise FaultInjected(name)


@contextmanager
def armed(spec: str) -> Iterator[None]:
    """Arm ``spec`` in this process for the block (in-process tests of ``raise``)."""
    global _armed
    previous, _armed = _armed, parse(spec)
    try:
        yield
    finally:
        _armed = previous
