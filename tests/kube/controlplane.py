"""A real Kubernetes v1.20.2 control plane for integration tests.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler run as local processes on
127.0.0.1 only, on free ports, so several control planes can run at once. The binaries are
built once by ``scripts/kube-control-plane.sh`` into a cache outside the checkout.

There is no kubelet: nodes are plain API objects. :func:`make_node` creates one and writes
the status a kubelet would report; :func:`mark_pods_ready` plays the kubelet for the pods
that the scheduler bound to such nodes.

Authentication is by static bearer tokens: ``ControlPlane.token`` is an admin in
``system:masters``; ``ControlPlane.driver_token`` belongs to the user ``edgefleet-driver``
with no groups and, under RBAC, no permissions until a test grants some.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KUBE_VERSION = "v1.20.2"
DEFAULT_CACHE = Path("/var/cache/edgefleet/kube-v1.20.2")
BUILD_SCRIPT = "scripts/kube-control-plane.sh"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")

ADMIN_USER = "edgefleet-admin"
DRIVER_USER = "edgefleet-driver"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 40
START_ATTEMPTS = 3  # a free port can be taken by someone else before a component binds it

_PR_SET_PDEATHSIG = 1
_ports_lock = threading.Lock()
_ports_handed_out: set[int] = set()


def kube_binaries() -> Path:
    """The directory with etcd and the three control-plane binaries.

    Raises RuntimeError, naming the script that builds them, when any is missing.
    """
    cache = Path(os.environ.get("EDGEFLEET_KUBE_CACHE") or DEFAULT_CACHE)
    bin_dir = cache / "bin"
    missing = [c for c in COMPONENTS if not os.access(bin_dir / c, os.X_OK)]
    if missing:
        raise RuntimeError(
            f"Kubernetes control-plane binaries missing in {bin_dir}: {', '.join(missing)}. "
            f"Build them once with `bash {BUILD_SCRIPT}` "
            "(about 7 minutes on 2 cores; EDGEFLEET_KUBE_CACHE picks another cache directory)."
        )
    return bin_dir


@dataclass
class _Component:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int = 0  # where this run's output starts in an appended-to log


class _PortTaken(RuntimeError):
    """A component exited because its port was taken meanwhile: retry on new ports."""


@dataclass
class ControlPlane:
    """A running control plane. ``stop()`` (or leaving a ``with`` block) ends it."""

    server: str
    token: str
    ca_cert_path: str | None
    kubeconfig_path: str
    workdir: Path
    name: str = "kube"
    driver_token: str = ""
    driver_user: str = DRIVER_USER
    etcd_endpoint: str = ""
    started_in_s: float = 0.0
    #: Seconds from the start to each readiness step ("etcd", "kube-apiserver", ...).
    timings: dict[str, float] = field(default_factory=dict)
    _components: list[_Component] = field(default_factory=list, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def pids(self) -> list[int]:
        return [c.process.pid for c in self._components]

    @property
    def logs_dir(self) -> Path:
        """One ``<component>.log`` per component."""
        return self.workdir / "logs"

    def running(self) -> bool:
        """True while every component process is alive."""
        return (
            not self._stopped
            and bool(self._components)
            and all(c.process.poll() is None for c in self._components)
        )

    def client_configuration(self, token: str | None = None) -> Any:
        """A ``kubernetes.client.Configuration`` for this server (admin token by default)."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.server
        cfg.api_key = {"authorization": token if token is not None else self.token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        if self.ca_cert_path:
            cfg.ssl_ca_cert = self.ca_cert_path
            cfg.verify_ssl = True
        else:
            cfg.verify_ssl = False
        return cfg

    def api_client(self, token: str | None = None) -> Any:
        """A ``kubernetes.client.ApiClient`` for this server (admin token by default)."""
        from kubernetes import client

        return client.ApiClient(self.client_configuration(token))

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of each component's log, for error messages."""
        return "\n".join(_tail(c.name, c.log_path, lines) for c in self._components)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """End every component: SIGTERM to its process group, SIGKILL after ``timeout``.

        Safe to call more than once; the logs stay in ``logs_dir``.
        """
        if not self._stopped:
            self._stopped = True
            _stop_components(self._components, timeout)

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_control_plane(
    workdir: Path, *, name: str = "kube", timeout: float = START_TIMEOUT_S
) -> ControlPlane:
    """Start etcd, kube-apiserver, kube-controller-manager and kube-scheduler.

    Everything (certificates, tokens, kubeconfig, etcd data, logs) goes under ``workdir``.
    Returns once the apiserver is ready, the controller-manager and the scheduler are
    healthy and the controller-manager has made the ``default`` service account (so pods
    can be created). On failure every started process is stopped and RuntimeError carries
    the last 40 lines of each component's log. ``ControlPlane.timings`` tells how long each
    step took.
    """
    bin_dir = kube_binaries()
    workdir = Path(workdir).resolve()
    t0 = time.monotonic()
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return _start(bin_dir, workdir, name=name, t0=t0, deadline=t0 + timeout)
        except _PortTaken:
            if attempt == START_ATTEMPTS:
                raise
            shutil.rmtree(workdir / "etcd", ignore_errors=True)
    raise AssertionError("unreachable")


def _start(bin_dir: Path, workdir: Path, *, name: str, t0: float, deadline: float) -> ControlPlane:
    pki = workdir / "pki"
    logs = workdir / "logs"
    for d in (pki, logs):
        d.mkdir(parents=True, exist_ok=True)

    etcd_client, etcd_peer, api_port, cm_port, sched_port = _free_ports(5)
    server = f"https://127.0.0.1:{api_port}"
    etcd_endpoint = f"http://127.0.0.1:{etcd_client}"

    ca_cert = _write_pki(pki)
    admin_token = secrets.token_urlsafe(32)
    driver_token = secrets.token_urlsafe(32)
    tokens = pki / "tokens.csv"
    tokens.write_text(
        f'{admin_token},{ADMIN_USER},uid-{ADMIN_USER},"system:masters"\n'
        f"{driver_token},{DRIVER_USER},uid-{DRIVER_USER}\n"
    )
    tokens.chmod(0o600)
    kubeconfig = workdir / "admin.kubeconfig"
    _write_kubeconfig(kubeconfig, name=name, server=server, ca=ca_cert, token=admin_token)

    cp = ControlPlane(
        server=server,
        token=admin_token,
        ca_cert_path=str(ca_cert),
        kubeconfig_path=str(kubeconfig),
        workdir=workdir,
        name=name,
        driver_token=driver_token,
        etcd_endpoint=etcd_endpoint,
    )

    def launch(component: str, args: list[str]) -> _Component:
        c = _spawn(component, [str(bin_dir / component), *args], logs / f"{component}.log")
        cp._components.append(c)
        return c

    try:
        etcd = launch(
            "etcd",
            [
                f"--name={name}",
                f"--data-dir={workdir / 'etcd'}",
                f"--listen-client-urls={etcd_endpoint}",
                f"--advertise-client-urls={etcd_endpoint}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster={name}=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster-token={name}-{secrets.token_hex(4)}",
                "--initial-cluster-state=new",
                "--logger=zap",
                "--log-outputs=stderr",
            ],
        )
        _wait(
            cp,
            etcd,
            deadline,
            "etcd /health",
            lambda: _http_ok(f"{etcd_endpoint}/health", expect=b'"health":"true"'),
            step="etcd",
            t0=t0,
        )

        apiserver = launch(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd_endpoint}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                "--insecure-port=0",
                f"--cert-dir={workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--token-auth-file={tokens}",
                # Unused for authentication here, but it makes the apiserver publish the
                # extension-apiserver-authentication ConfigMap that the controller-manager
                # and the scheduler look up for their delegated authentication.
                f"--client-ca-file={ca_cert}",
                "--authorization-mode=Node,RBAC",
                "--anonymous-auth=false",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                # The "kubernetes" service would point at 127.0.0.1, which Endpoints reject.
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
        )
        _wait(
            cp,
            apiserver,
            deadline,
            "kube-apiserver /readyz",
            lambda: _http_ok(f"{server}/readyz", token=admin_token, ca=ca_cert),
            step="kube-apiserver",
            t0=t0,
        )

        common = [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--port=0",
            "--profiling=false",
            "--v=1",
        ]
        cm = launch(
            "kube-controller-manager",
            [
                *common,
                f"--secure-port={cm_port}",
                f"--cert-dir={workdir / 'controller-manager-certs'}",
                # No kubelets here: the node lifecycle controller would mark every node
                # NotReady after 40 s and evict its pods.
                "--controllers=*,-nodelifecycle",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={ca_cert}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--use-service-account-credentials=false",
            ],
        )
        scheduler = launch(
            "kube-scheduler",
            [
                *common,
                f"--secure-port={sched_port}",
                f"--cert-dir={workdir / 'scheduler-certs'}",
            ],
        )
        _wait(
            cp,
            cm,
            deadline,
            "kube-controller-manager /healthz",
            lambda: _http_ok(f"https://127.0.0.1:{cm_port}/healthz"),
            step="kube-controller-manager",
            t0=t0,
        )
        _wait(
            cp,
            scheduler,
            deadline,
            "kube-scheduler /healthz",
            lambda: _http_ok(f"https://127.0.0.1:{sched_port}/healthz"),
            step="kube-scheduler",
            t0=t0,
        )
        _wait(
            cp,
            cm,
            deadline,
            "the default service account and its token",
            lambda: _default_service_account_ready(server, admin_token, ca_cert),
            step="default-service-account",
            t0=t0,
        )
    except BaseException:
        cp.stop(timeout=5.0)
        raise
    cp.started_in_s = time.monotonic() - t0
    return cp


# --- kubelet stand-ins ---------------------------------------------------------------------


def make_node(
    api: Any,
    name: str,
    *,
    labels: dict[str, str],
    cpu: str = "4",
    memory: str = "8Gi",
    arch: str = "amd64",
    pods: str = "110",
) -> None:
    """Create a Ready Node the way a kubelet registers one (``api``: a CoreV1Api).

    Sets capacity/allocatable, a Ready condition and nodeInfo, and lifts the
    ``node.kubernetes.io/not-ready`` taint that admission puts on new nodes (the node
    lifecycle controller, which would lift it, is off).
    """
    all_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": arch,
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": arch,
        **labels,
    }
    created = api.create_node(
        body={"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": all_labels}}
    )
    now = _now()
    resources = {"cpu": cpu, "memory": memory, "pods": pods, "ephemeral-storage": "100Gi"}
    api.patch_node_status(
        name,
        {
            "status": {
                "capacity": resources,
                "allocatable": resources,
                "phase": "Running",
                "addresses": [{"type": "Hostname", "address": name}],
                "conditions": [
                    {
                        "type": cond,
                        "status": "False",
                        "reason": reason,
                        "message": "edgefleet test node",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                    for cond, reason in (
                        ("MemoryPressure", "KubeletHasSufficientMemory"),
                        ("DiskPressure", "KubeletHasNoDiskPressure"),
                        ("PIDPressure", "KubeletHasSufficientPID"),
                    )
                ]
                + [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "edgefleet test node is ready",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
                "nodeInfo": {
                    "machineID": name,
                    "systemUUID": name,
                    "bootID": name,
                    "kernelVersion": "6.1.0",
                    "osImage": "edgefleet test node",
                    "containerRuntimeVersion": "containerd://1.4.0",
                    "kubeletVersion": KUBE_VERSION,
                    "kubeProxyVersion": KUBE_VERSION,
                    "operatingSystem": "linux",
                    "architecture": arch,
                },
            }
        },
    )
    taints = list(created.spec.taints or []) if created.spec is not None else []
    kept = [t for t in taints if t.key != "node.kubernetes.io/not-ready"]
    if len(kept) != len(taints):
        api.patch_node(
            name,
            {
                "spec": {
                    "taints": [{"key": t.key, "value": t.value, "effect": t.effect} for t in kept]
                }
            },
        )


def mark_pods_ready(
    api: Any, namespace: str, label_selector: str, *, with_ip_only: bool = False
) -> int:
    """Report every pod bound to a node and matching ``label_selector`` as Running and
    Ready, as its kubelet would (``api``: a CoreV1Api); with ``with_ip_only``, only those
    that have an IP already (a kubelet never reports a pod Ready before its IP). Returns
    how many pods it patched."""
    count = 0
    pods = api.list_namespaced_pod(namespace, label_selector=label_selector)
    for pod in pods.items:
        if pod.metadata.deletion_timestamp is not None or not pod.spec.node_name:
            continue
        if with_ip_only and not pod.status.pod_ip:
            continue
        now = _now()
        containers = list(pod.spec.containers or [])
        api.patch_namespaced_pod_status(
            pod.metadata.name,
            namespace,
            {
                "status": {
                    "phase": "Running",
                    "startTime": now,
                    "conditions": [
                        {"type": cond, "status": "True", "lastTransitionTime": now}
                        for cond in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
                    ],
                    "containerStatuses": [
                        {
                            "name": c.name,
                            "image": c.image,
                            "imageID": f"docker-pullable://{c.image}",
                            "containerID": f"containerd://{secrets.token_hex(16)}",
                            "ready": True,
                            "started": True,
                            "restartCount": 0,
                            "state": {"running": {"startedAt": now}},
                        }
                        for c in containers
                    ],
                }
            },
        )
        count += 1
    return count


# --- internals -----------------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports, never one this process handed out before."""
    ports: list[int] = []
    with _ports_lock:
        while len(ports) < n:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                ports.append(port)
    return ports


def _write_pki(pki: Path) -> Path:
    """A CA, an apiserver serving cert for 127.0.0.1/localhost and a service-account key."""
    now = dt.datetime.now(dt.UTC)
    not_before = now - dt.timedelta(hours=1)
    not_after = now + dt.timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet-test-ca")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    srv_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local"),
    ]
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(srv_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def write(path: Path, data: bytes, mode: int) -> None:
        path.write_bytes(data)
        path.chmod(mode)

    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    no_enc = serialization.NoEncryption()
    write(pki / "ca.crt", ca_cert.public_bytes(pem), 0o644)
    write(pki / "ca.key", ca_key.private_bytes(pem, pkcs8, no_enc), 0o600)
    write(pki / "apiserver.crt", srv_cert.public_bytes(pem), 0o644)
    write(pki / "apiserver.key", srv_key.private_bytes(pem, pkcs8, no_enc), 0o600)
    write(pki / "sa.key", sa_key.private_bytes(pem, pkcs8, no_enc), 0o600)
    write(
        pki / "sa.pub",
        sa_key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo),
        0o644,
    )
    return pki / "ca.crt"


def _write_kubeconfig(path: Path, *, name: str, server: str, ca: Path, token: str) -> None:
    # JSON is YAML, so client-go and the Python client both read this.
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": ADMIN_USER, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": ADMIN_USER}}],
        "current-context": name,
        "preferences": {},
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGKILL it when the process that started it
    # dies, so a killed test run leaves no control plane behind.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _spawn(name: str, argv: list[str], log_path: Path) -> _Component:
    with open(log_path, "ab") as log:
        offset = log.tell()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole by stop()
            preexec_fn=_die_with_parent,
            close_fds=True,
        )
    return _Component(name=name, process=proc, log_path=log_path, log_offset=offset)


def _stop_components(components: list[_Component], timeout: float) -> None:
    alive = [c for c in reversed(components) if c.process.poll() is None]
    for c in alive:
        _killpg(c.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for c in alive:
        remaining = max(0.0, deadline - time.monotonic())
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.process.wait(timeout=remaining)
    for c in reversed(components):
        # SIGKILL the group even when its leader exited, in case it left children.
        _killpg(c.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.process.wait(timeout=5.0)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _tail(name: str, path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        text = [f"<no log: {exc}>"]
    body = "\n".join(f"    {line}" for line in text)
    return f"--- {name} ({path}), last {lines} lines:\n{body}"


def _wait(
    cp: ControlPlane,
    component: _Component,
    deadline: float,
    what: str,
    check: Callable[[], bool],
    *,
    step: str,
    t0: float,
) -> None:
    delay = 0.05
    while True:
        code = component.process.poll()
        if code is not None:
            error = _PortTaken if _port_taken(component) else RuntimeError
            raise error(
                f"control plane {cp.name!r}: {component.name} exited with code {code} "
                f"while waiting for {what}\n{cp.log_tails()}"
            )
        if check():
            cp.timings[step] = round(time.monotonic() - t0, 3)
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"control plane {cp.name!r}: timed out waiting for {what}\n{cp.log_tails()}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def _port_taken(component: _Component) -> bool:
    try:
        with open(component.log_path, "rb") as f:
            f.seek(component.log_offset)
            out = f.read()
    except OSError:
        return False
    return b"address already in use" in out


def _ssl_context(ca: Path | None) -> ssl.SSLContext:
    if ca is not None:
        return ssl.create_default_context(cafile=str(ca))
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # controller-manager/scheduler self-signed health ports
    return ctx


def _get(url: str, *, token: str | None = None, ca: Path | None = None) -> tuple[int, bytes] | None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, headers=headers)
    ctx = _ssl_context(ca) if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(req, timeout=2.0, context=ctx) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except (OSError, ssl.SSLError):
        return None


def _http_ok(
    url: str, *, token: str | None = None, ca: Path | None = None, expect: bytes = b""
) -> bool:
    got = _get(url, token=token, ca=ca)
    return got is not None and got[0] == 200 and expect in got[1]


def _default_service_account_ready(server: str, token: str, ca: Path) -> bool:
    got = _get(f"{server}/api/v1/namespaces/default/serviceaccounts/default", token=token, ca=ca)
    if got is None or got[0] != 200:
        return False
    sa: Mapping[str, Any] = json.loads(got[1])
    return bool(sa.get("secrets"))


def credentials(cp: ControlPlane, token: str | None = None) -> dict[str, Any]:
    ca = Path(cp.ca_cert_path).read_text() if cp.ca_cert_path else None
    return {
        "token": token or cp.token,
        **({"caData": ca} if ca else {"insecureSkipTLSVerify": True}),
    }
