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
from typing import Any

from node_agent.agent.backoff import Backoff
from node_agent.agent.clock import SYSTEM_CLOCK, Clock
from node_agent.cluster import handover
from node_agent.cluster.client import PullClient, Refused, Unreachable
from node_agent.cluster.contract import (
    INFERENCE_SELECTOR,
    NODE_LABEL_PREFIX,
    PREVIOUS_LABEL_PREFIX,
    DesiredState,
    ObservedReport,
)
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
        # Whether a node is in a handover after the last apply (the worker then applies
        # at each report, to finish it soon after the new pod is Ready).
        self.handing_over = False
        self._node_local: bool | None = None  # asked of the API server at first use
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
                next_apply = now + (
                    self.settings.report_interval_s
                    if self.handing_over
                    else self.settings.resync_interval_s
                )
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
        """Make the cluster match the last desired state; False when there is none.

        The Secret, the Services and the DaemonSets first, then each node's labels, make
        before break (node_agent/cluster/handover.py): a node moving to another version
        keeps the one that serves under its previous label until the new one's pod is
        Ready and in its Service's Endpoints, as this agent sees them; the handover
        finishes in the apply that sees it so (the worker applies every
        ``report_interval_s`` while one is under way). Then the DaemonSets of versions
        no node names any more go, and the Service of a model no node names."""
        with self._lock:
            desired = self.desired
        if desired is None:
            return False
        ns = desired.namespace
        errors: list[str] = []
        self.handing_over = False
        try:
            self.kube.ensure_namespace(ns)
            self.kube.apply(desired.secret, force=True)
            for obj in [*map(self._for_server, desired.services), *desired.daemonsets]:
                try:
                    self.kube.apply(obj)
                except KubeError as exc:
                    errors.append(str(exc))
            used = self._hand_over(desired)
            self._collect_garbage(desired, used)
        except KubeError as exc:
            errors.append(str(exc))
        self.applies += 1
        self.applied_revision = desired.revision
        self.apply_error = "; ".join(errors)[:2000] or None
        if errors:
            log.error("applying revision %d: %s", desired.revision, self.apply_error)
        return True

    def _for_server(self, service: dict[str, Any]) -> dict[str, Any]:
        """The Service as this API server takes it: one older than 1.22 refuses
        ``internalTrafficPolicy`` (and has no node-local Services), as in push mode."""
        if self._node_local is None:
            self._node_local = self.kube.server_version() >= (1, 22)
            if not self._node_local:
                log.warning(
                    "this API server has no internalTrafficPolicy (Kubernetes < 1.22): "
                    "the models' Services are cluster-wide here, not node-local"
                )
        if self._node_local:
            return service
        spec = {k: v for k, v in service["spec"].items() if k != "internalTrafficPolicy"}
        return {**service, "spec": spec}

    def _hand_over(self, desired: DesiredState) -> set[tuple[str, str]]:
        """Label each node for the version it should run of each model, make before
        break; the (model, version) pairs some node's labels name afterwards."""
        seen: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for pod in self.kube.list_pods(desired.namespace, INFERENCE_SELECTOR):
            o = observe_pod(pod)
            if o is not None:
                seen.setdefault((o.node, o.model), []).append(pod)
        # A pod serves when both show it so: Ready above and among the ready addresses.
        routed = handover.routed_pods(
            self.kube.list_endpoints(desired.namespace, INFERENCE_SELECTOR)
        )
        used: set[tuple[str, str]] = set()
        for item in self.kube.list_nodes():
            node = item["metadata"]["name"]
            have = item["metadata"].get("labels") or {}
            wanted_labels = desired.node_labels.get(node, {})
            models = {
                key.removeprefix(prefix)
                for key in (*wanted_labels, *have)
                for prefix in (NODE_LABEL_PREFIX, PREVIOUS_LABEL_PREFIX)
                if key.startswith(prefix)
            }
            for model in sorted(models):
                key, prev_key = handover.node_label(model), handover.previous_label(model)
                current, previous = have.get(key), have.get(prev_key)
                # A node the desired state does not name keeps its version; its
                # handover may finish.
                wanted = wanted_labels.get(key, current)
                after = handover.step(
                    wanted, current, previous, seen.get((node, model), ()), routed
                )
                if after != (current, previous):
                    self.kube.label_node(node, {key: after[0], prev_key: after[1]})
                used.update((model, v) for v in after if v is not None)
                self.handing_over |= after[1] is not None
        return used

    def _collect_garbage(self, desired: DesiredState, used: set[tuple[str, str]]) -> None:
        """Delete the DaemonSets the desired state does not name and no node's label
        names (the version a handover keeps serving stays until it ends), and the
        Services of models no node names."""
        ns = desired.namespace
        keep = {ds["metadata"]["name"] for ds in desired.daemonsets}
        for ds in self.kube.list_daemonsets(ns, INFERENCE_SELECTOR):
            meta = ds["metadata"]
            labels = meta.get("labels") or {}
            pair = (labels.get("edgefleet.io/model", ""), labels.get("edgefleet.io/version", ""))
            if meta["name"] not in keep and pair not in used:
                self.kube.delete_daemonset(ns, meta["name"])
        keep = {svc["metadata"]["name"] for svc in desired.services}
        models = {model for model, _ in used}
        for svc in self.kube.list_services(ns, INFERENCE_SELECTOR):
            meta = svc["metadata"]
            model = (meta.get("labels") or {}).get("edgefleet.io/model")
            if meta["name"] not in keep and model not in models:
                self.kube.delete_service(ns, meta["name"])

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
