"""The cluster agent: pull mode's edge half, one per cluster (a Deployment of one
replica from the agent chart, ``edgefleet-cluster-agent``).

It connects out to the controller (no inbound port on the edge side), and two loops run
side by side, so that a long poll never delays the cluster's own upkeep:

- the poller long-polls the desired state with the revision it has as resume token,
  writes every new state to disk before anything else, and wakes the worker;
- the worker applies the last desired state when it changes and again every
  ``resync_interval_s`` (drift repair: a DaemonSet deleted or a label removed behind its
  back comes back within that, whether or not the controller is reachable), and reports
  the nodes and inference pods every ``report_interval_s`` and right after each apply.

When the controller is unreachable the poller backs off (with jitter, so a fleet of
clusters does not reconnect in step) and the worker goes on from the last desired state,
the one on disk after a restart. Applying is level-triggered like the push driver: the
whole state every time, by server-side apply, so repeating it is harmless."""

from __future__ import annotations

import logging
import os
import threading

from node_agent.agent.backoff import Backoff
from node_agent.agent.clock import SYSTEM_CLOCK, Clock
from node_agent.cluster.client import PullClient, Refused, Unreachable
from node_agent.cluster.contract import INFERENCE_SELECTOR, DesiredState, ObservedReport
from node_agent.cluster.kube import KubeApi, KubeError
from node_agent.cluster.pods import node_report, observe_pod
from node_agent.cluster.settings import ClusterAgentSettings
from node_agent.cluster.store import Store
from node_agent.discovery import api_url_from_env

log = logging.getLogger("edgefleet.cluster-agent")

# The longest a loop sleeps before it looks at its stop event again.
TICK_S = 0.5


class ClusterAgent:
    def __init__(
        self,
        settings: ClusterAgentSettings,
        *,
        kube: KubeApi | None = None,
        controller: PullClient | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.store = Store(settings.state_dir)
        if kube is None:
            api_url = settings.kubernetes_api_url or api_url_from_env(os.environ)
            if api_url is None:
                raise KubeError(
                    "no API server: EDGEFLEET_KUBERNETES_API_URL, or KUBERNETES_SERVICE_HOST "
                    "as the kubelet sets it in a pod"
                )
            kube = KubeApi(
                api_url=api_url,
                token_file=settings.kubernetes_token_file,
                ca_file=settings.kubernetes_ca_file,
                timeout_s=settings.request_timeout_s,
            )
        self.kube = kube
        verify: str | bool = (
            str(settings.controller_ca_file) if settings.controller_ca_file else True
        )
        # One client per loop: each thread keeps its own connection.
        self.poll_client = controller or PullClient(
            settings.controller_url,
            settings.cluster,
            timeout_s=settings.request_timeout_s,
            verify=verify,
        )
        self.report_client = controller or PullClient(
            settings.controller_url,
            settings.cluster,
            timeout_s=settings.request_timeout_s,
            verify=verify,
        )
        self.backoff = Backoff(1.0, settings.retry_max_s, clock)
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self.desired: DesiredState | None = self.store.desired()
        if self.desired is not None:
            log.info("starting from the desired state on disk (revision %d)", self.desired.revision)
            self._changed.set()
        self.applied_revision: int | None = None
        self.apply_error: str | None = None
        self.server_wait_s = 25.0
        # Counters for logs and tests.
        self.polls = self.applies = self.reports = 0

    def close(self) -> None:
        self.poll_client.close()
        if self.report_client is not self.poll_client:
            self.report_client.close()
        self.kube.close()

    # -- the loops

    def run(self, stop: threading.Event) -> None:
        poller = threading.Thread(
            target=self.poll_loop, args=(stop,), name="edgefleet-pull", daemon=True
        )
        poller.start()
        try:
            self.work_loop(stop)
        finally:
            stop.set()
            poller.join(self.settings.request_timeout_s)

    def work_loop(self, stop: threading.Event) -> None:
        next_apply = next_report = 0.0
        while not stop.is_set():
            now = self.clock.monotonic()
            if self._changed.is_set() or now >= next_apply:
                self._changed.clear()
                if self.apply_once():
                    next_report = now  # say at once what the apply did
                next_apply = now + self.settings.resync_interval_s
            if now >= next_report:
                self.report_once()
                next_report = now + self.settings.report_interval_s
            wait = min(next_apply, next_report) - self.clock.monotonic()
            self._changed.wait(max(0.01, min(wait, TICK_S)))

    def poll_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if not self.backoff.ready():
                self.clock.wait(stop, TICK_S)
                continue
            self.poll_once()

    # -- one step of each

    def _credential(self) -> str:
        credential = self.store.credential()
        if credential is not None:
            return credential
        token = self.settings.join_token
        if token is None:
            raise Refused(401, "no cluster credential, and no join token to enrol with")
        got = self.poll_client.enroll(token.get_secret_value())
        self.store.save_credential(got.credential)
        log.info("enrolled as cluster %s", got.cluster)
        return got.credential

    def poll_once(self) -> bool:
        """One long poll; True when it brought a new desired state."""
        try:
            credential = self._credential()
            since = self.desired.revision if self.desired is not None else None
            state = self.poll_client.desired(
                credential, since=since, wait_s=self.settings.poll_wait_s or self.server_wait_s
            )
        except Unreachable as exc:
            delay = self.backoff.failure()
            log.warning("%s; working from the last desired state, retry in %.1f s", exc, delay)
            return False
        except Refused as exc:
            if exc.status == 401:
                # Revoked (an admin reset the cluster): enrol again if we may.
                self.store.save_credential(None)
            delay = self.backoff.failure(permanent=True)
            log.error("the controller refused: %s; retry in %.1f s", exc, delay)
            return False
        self.backoff.success()
        self.polls += 1
        self.server_wait_s = state.poll_timeout_s
        with self._lock:
            current = self.desired
            if state.changed:
                new: DesiredState | None = state
            elif current is not None and current.secret != state.secret:
                new = current.model_copy(update={"secret": state.secret})
            else:
                new = None
            if new is None:
                return False
            # On disk first: a restart from here on applies this state.
            self.store.save_desired(new)
            self.desired = new
        if state.changed:
            log.info("desired state revision %d", new.revision)
        self._changed.set()
        return True

    def apply_once(self) -> bool:
        """Make the cluster match the last desired state; False when there is none."""
        with self._lock:
            desired = self.desired
        if desired is None:
            return False
        ns = desired.namespace
        errors: list[str] = []
        try:
            self.kube.ensure_namespace(ns)
            self.kube.apply(desired.secret, force=True)
            for ds in desired.daemonsets:
                try:
                    self.kube.apply(ds)
                except KubeError as exc:
                    errors.append(str(exc))
            have = {
                n["metadata"]["name"]: n["metadata"].get("labels") or {}
                for n in self.kube.list_nodes()
            }
            for node, labels in sorted(desired.node_labels.items()):
                if node not in have:
                    continue  # gone from the cluster; the next report says so
                patch = {k: v for k, v in labels.items() if have[node].get(k) != v}
                if patch:
                    self.kube.label_node(node, patch)
            # DaemonSets of versions no node should run any more go (the push driver's
            # garbage collection).
            keep = {ds["metadata"]["name"] for ds in desired.daemonsets}
            for ds in self.kube.list_daemonsets(ns, INFERENCE_SELECTOR):
                name = ds["metadata"]["name"]
                if name not in keep:
                    self.kube.delete_daemonset(ns, name)
        except KubeError as exc:
            errors.append(str(exc))
        self.applies += 1
        self.applied_revision = desired.revision
        self.apply_error = "; ".join(errors)[:2000] or None
        if errors:
            log.error("applying revision %d: %s", desired.revision, self.apply_error)
        return True

    def report_once(self) -> bool:
        """Report the nodes and inference pods; False when that was not possible."""
        credential = self.store.credential()
        if credential is None:
            return False  # the poller enrols first
        with self._lock:
            desired = self.desired
        try:
            nodes = [node_report(n) for n in self.kube.list_nodes()]
            pods = self.kube.list_pods(desired.namespace, INFERENCE_SELECTOR) if desired else []
        except KubeError as exc:
            log.error("cannot read the cluster: %s", exc)
            return False
        workloads = [w for w in map(observe_pod, pods) if w is not None]
        report = ObservedReport(
            applied_revision=self.applied_revision,
            nodes=nodes,
            workloads=workloads,
            apply_error=self.apply_error,
        )
        try:
            self.report_client.report(credential, report)
        except Unreachable as exc:
            log.debug("report not delivered: %s", exc)
            return False
        except Refused as exc:
            log.error("the controller refused the report: %s", exc)
            return False
        self.reports += 1
        return True
