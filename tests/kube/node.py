"""A real Kubernetes worker node for integration tests: containerd and a kubelet joined to a
control plane from controlplane.py, running real containers under cgroup v1.

The binaries come from ``scripts/kube-node.sh`` (the kubelet, built from the same Debian
source as the control plane, and the pause image) and Debian's containerd, runc and CNI
plugins; the images the pods run from ``scripts/build-images.sh``. No registry is
reachable: every image is imported with ``ctr images import`` and pods use
``imagePullPolicy: Never`` or ``IfNotPresent``.

What a node changes on the machine, and how it is kept or undone:

- Fixed host paths (``/var/lib/kubelet``, ``/var/lib/containerd``, ``/var/log/pods``,
  ``/run/containerd``, ``/run/netns``, the hostPath volumes under ``/var/lib``): containerd
  starts in a private mount namespace in which the node's own directories are bind-mounted
  over ``/var/lib``, ``/var/log`` and ``/run``, and the kubelet joins that namespace. The
  namespace, and every mount made in it, ends with its last process. containerd's images
  and snapshots are on a tmpfs there: nothing to delete afterwards.
- Processes and cgroups: containerd, its shims, the kubelet, the node lifecycle
  controller and every container run in one cgroup tree of their own,
  ``/edgefleet-node-<pid>-<hex>`` in each hierarchy (the kubelet's ``--cgroup-root``).
  ``stop()`` kills what is left in it and removes it; a later start sweeps the trees of
  test processes that died without stopping their node.
- Sysctls the kubelet sets when it starts (``vm.overcommit_memory``, ``kernel.panic``,
  ``kernel.panic_on_oops``, ...) and the bridge plugin's IP forwarding: saved first, put
  back as soon as the node is Ready (the kubelet does not look at them again) and at stop.
- The network: pods get addresses on a bridge of their own (``efn...``), a /24 no route of
  the machine uses, with no default route out and no NAT: the host (the kubelet's probes,
  the tests) reaches the pods, the pods reach nothing else. The bridge is deleted at stop.
- The ``kubernetes`` Service, as kube-proxy would make it (there is none: it rewrites
  iptables): pods reach the API server at its ClusterIP, ``10.0.0.1:443``, what the
  kubelet puts in every pod's ``KUBERNETES_SERVICE_HOST``/``PORT`` and a name of the API
  server's certificate. Pods route that address to the bridge, the host holds it on the
  bridge (it goes with the bridge), and a TCP relay in the test process forwards it to the
  API server on 127.0.0.1. So one real node at a time on a machine.
- iptables: untouched (``--make-iptables-util-chains=false``, no portmap, no masquerade).

The kubelet registers as ``localhost`` and listens on 127.0.0.1 only (it refuses
``--node-ip=127.0.0.1``); the API server reaches it there for logs and exec. It
authenticates with the control plane's admin token. The control plane of controlplane.py
runs without the node lifecycle controller (its nodes are API objects with no kubelet);
a real node needs it to lift the ``node.kubernetes.io/not-ready`` taint, so the node
starts a second kube-controller-manager running only that controller. Give each real node
a control plane of its own: the lifecycle controller would mark the stand-in nodes of
other tests NotReady.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tests.kube.controlplane import SERVICE_CLUSTER_IP_RANGE, ControlPlane, kube_binaries

NODE_NAME = "localhost"
PAUSE_IMAGE = "k8s.gcr.io/pause:3.2"
BUILD_SCRIPT = "scripts/kube-node.sh"
CGROUP_FS = Path("/sys/fs/cgroup")
CNI_BIN_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
CNI_PLUGINS = ("bridge", "host-local", "loopback")
TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "unshare", "nsenter", "ip")
CGROUP_PREFIX = "edgefleet-node-"
RUNTIME_CGROUP = "runtime"  # containerd, its shims, the kubelet; pods go to kubepods/
BRIDGE_PREFIX = "efn"
POD_SUBNETS = ipaddress.IPv4Network("10.88.0.0/16")
# The `kubernetes` Service's ClusterIP (the first address of the service range) and port.
API_SERVICE_IP = next(ipaddress.IPv4Network(SERVICE_CLUSTER_IP_RANGE).hosts())
API_SERVICE_PORT = 443
# Set by the kubelet at start (setupKernelTunables) or by the bridge plugin per pod.
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
)
KERNEL_SYSCTLS = tuple(s for s in SYSCTLS if not s.startswith("net/"))
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 40
_PR_SET_PDEATHSIG = 1
_CONTAINERD_SOCKET = "/run/containerd/containerd.sock"  # inside the node's mount namespace


REPO = Path(__file__).resolve().parents[2]
IMAGES_SCRIPT = "scripts/build-images.sh"


@dataclass(frozen=True)
class BuiltImage:
    """An image built by scripts/build-images.sh from a shipped Dockerfile."""

    name: str
    ref: str
    archive: Path
    size_bytes: int


def built_images(*names: str) -> dict[str, BuiltImage]:
    """The images built from the current inputs (Dockerfile, sources, pins), as
    ``scripts/build-images.sh --check`` finds them; RuntimeError, naming the command
    that builds them, when one is missing or stale."""
    result = subprocess.run(
        ["bash", str(REPO / IMAGES_SCRIPT), "--check", *names],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        # The pins are this environment's (scripts/test passes its venv the same way).
        env={**os.environ, "EDGEFLEET_VENV": sys.prefix},
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"images not built for the current sources: {result.stderr.strip()}\n"
            f"Build them with `bash {IMAGES_SCRIPT} {' '.join(names)}` (cold: about 10 "
            "minutes for the base and the inference image; cached by their inputs after)."
        )
    out = {}
    for line in result.stdout.splitlines():
        name, ref, archive, size = line.split()
        out[name] = BuiltImage(name, ref, Path(archive), int(size))
    return out


class NodeUnavailable(RuntimeError):
    """The machine cannot run a real node (not root, no cgroup v1)."""


def machine_problems() -> list[str]:
    """Why this machine cannot run a real node at all: needs root and cgroup v1 (with the
    memory controller). Empty when it can."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the real node needs root (containerd, runc, mounts, cgroups)")
    if not (CGROUP_FS / "memory" / "memory.limit_in_bytes").exists():
        problems.append(
            "the real node needs cgroup v1 with the memory controller at /sys/fs/cgroup/memory "
            "(the kubelet v1.20 and runc 1.1 of Debian bookworm, as tested here)"
        )
    return problems


def node_binaries() -> dict[str, Path]:
    """The kubelet, the pause image archive, the runtime tools and the CNI plugin
    directory. Raises RuntimeError naming the script that installs what is missing."""
    found: dict[str, Path] = {}
    missing = []
    bin_dir = kube_binaries()
    kubelet = bin_dir / "kubelet"
    if os.access(kubelet, os.X_OK):
        found["kubelet"] = kubelet
    else:
        missing.append(str(kubelet))
    pause = bin_dir.parent / "images" / "pause-3.2.tar"
    if pause.is_file():
        found["pause"] = pause
    else:
        missing.append(str(pause))
    for tool in TOOLS:
        path = shutil.which(tool)
        if path:
            found[tool] = Path(path)
        else:
            missing.append(tool)
    cni = next((d for d in CNI_BIN_DIRS if all((d / p).exists() for p in CNI_PLUGINS)), None)
    if cni is not None:
        found["cni"] = cni
    else:
        missing.append(f"CNI plugins {', '.join(CNI_PLUGINS)}")
    if missing:
        raise RuntimeError(
            f"real-node binaries missing: {', '.join(missing)}. Build and install them once "
            f"with `bash {BUILD_SCRIPT}` (about 10 minutes on 2 cores; it also installs "
            "containerd, runc and the CNI plugins from Debian)."
        )
    return found


@dataclass
class _Process:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Node:
    """A running node. ``stop()`` (or leaving a ``with`` block) ends it."""

    name: str
    control_plane: ControlPlane
    workdir: Path
    cgroup_root: str
    bridge: str
    subnet: ipaddress.IPv4Network
    tools: dict[str, Path]
    saved_sysctls: dict[str, str]
    #: Seconds from the start to each step ("containerd", "images", "kubelet", "ready").
    timings: dict[str, float] = field(default_factory=dict)
    started_in_s: float = 0.0
    _processes: list[_Process] = field(default_factory=list, repr=False)
    _relay: _Relay | None = field(default=None, repr=False)
    _mount_ns: str = field(default="", repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def host_dir(self) -> Path:
        """What the node's processes see as ``/var/lib`` (hostPath volumes live here)."""
        return self.workdir / "var-lib"

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The host's address on the pods' bridge: what a pod reaches the host at (a
        server of the test bound there is reachable from the pods, and only from them)."""
        return next(self.subnet.hosts())

    @property
    def containerd_pid(self) -> int:
        return self._processes[0].process.pid

    def in_namespace(self, *argv: str, timeout: float = 120.0) -> str:
        """Run ``argv`` inside the node's mount namespace; its stdout, or RuntimeError."""
        result = subprocess.run(
            [str(self.tools["nsenter"]), f"--target={self.containerd_pid}", "--mount", "--", *argv],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited with {result.returncode}: "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result.stdout.decode(errors="replace")

    def ctr(self, *args: str, timeout: float = 300.0) -> str:
        return self.in_namespace(
            str(self.tools["ctr"]),
            f"--address={_CONTAINERD_SOCKET}",
            "-n",
            "k8s.io",
            *args,
            timeout=timeout,
        )

    def import_image(self, archive: Path) -> None:
        """``ctr images import`` of a docker-archive or OCI archive (the pods then use
        ``imagePullPolicy: Never``)."""
        self.ctr("images", "import", str(archive))

    def images(self) -> list[str]:
        return self.ctr("images", "list", "--quiet").split()

    def cgroup_dirs(self, subsystem: str) -> list[Path]:
        return [p for p in (CGROUP_FS / subsystem / self.cgroup_root).rglob("*") if p.is_dir()]

    def pod_cgroup(self, subsystem: str, pod_uid: str) -> Path:
        """The pod's cgroup directory in ``subsystem`` (the kubelet's cgroupfs layout:
        ``<root>/kubepods[/burstable|/besteffort]/pod<uid>``)."""
        root = CGROUP_FS / subsystem / self.cgroup_root / "kubepods"
        for candidate in (root / f"pod{pod_uid}", *root.glob(f"*/pod{pod_uid}")):
            if candidate.is_dir():
                return candidate
        raise LookupError(f"no {subsystem} cgroup for pod {pod_uid} under {root}")

    def container_cgroup(self, subsystem: str, pod_uid: str, container_id: str) -> Path:
        """A container's cgroup; ``container_id`` as in the pod status (``containerd://…``)."""
        path = self.pod_cgroup(subsystem, pod_uid) / container_id.rpartition("://")[2]
        if not path.is_dir():
            raise LookupError(f"no {subsystem} cgroup {path}")
        return path

    def running(self) -> bool:
        return not self._stopped and all(p.process.poll() is None for p in self._processes)

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(_tail(p.name, p.log_path, lines) for p in self._processes)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> list[str]:
        """End the node and undo what it changed; returns what could not be undone (empty
        when nothing is left behind). Safe to call more than once; logs stay."""
        if self._stopped:
            return []
        self._stopped = True
        # SIGKILL at once, everything together: a kubelet or containerd told to stop does
        # nothing that matters here (its state goes with the node's directory), and no
        # process of the tree may outlive the others to restart what they ran.
        left = _kill_cgroup_tree(
            self.cgroup_root, timeout=timeout, reap=[p.process for p in self._processes]
        )
        problems = [f"processes still in cgroup {self.cgroup_root}: {left}"] if left else []
        if self._relay is not None:
            self._relay.close()
        problems += _remove_cgroup_tree(self.cgroup_root)
        problems += _delete_bridge(self.bridge)
        problems += _restore_sysctls(self.saved_sysctls)
        return problems

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_node(
    control_plane: ControlPlane,
    workdir: Path,
    *,
    images: tuple[Path, ...] = (),
    timeout: float = START_TIMEOUT_S,
) -> Node:
    """Start containerd and the kubelet, import ``images`` (docker or OCI archives), and
    return once the node is Ready and its not-ready taint is gone. On failure everything is
    stopped and undone, and RuntimeError carries the last lines of each log."""
    problems = machine_problems()
    if problems:
        raise NodeUnavailable("; ".join(problems))
    tools = node_binaries()
    _sweep_stale()
    workdir = Path(workdir).resolve()
    t0 = time.monotonic()
    deadline = t0 + timeout
    token = f"{os.getpid()}-{random.getrandbits(24):06x}"
    node = Node(
        name=NODE_NAME,
        control_plane=control_plane,
        workdir=workdir,
        cgroup_root=f"{CGROUP_PREFIX}{token}",
        bridge=f"{BRIDGE_PREFIX}{os.getpid():07x}{random.getrandbits(8):02x}",
        subnet=_free_subnet(),
        tools=tools,
        saved_sysctls=_read_sysctls(),
    )
    try:
        _start(node, images, t0=t0, deadline=deadline)
    except BaseException:
        node.stop(timeout=5.0)
        raise
    node.started_in_s = round(time.monotonic() - t0, 3)
    return node


def _start(node: Node, images: tuple[Path, ...], *, t0: float, deadline: float) -> None:
    cp = node.control_plane
    w = node.workdir
    for d in ("var-lib", "var-log", "run", "cni", "logs", "pki"):
        (w / d).mkdir(parents=True, exist_ok=True)
    _make_cgroup_tree(node.cgroup_root)

    (w / "cni" / "10-edgefleet.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "0.4.0",
                "name": "edgefleet",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": node.bridge,
                        "isGateway": True,  # the host's address on it: probes reach pods
                        "isDefaultGateway": False,  # pods get no route beyond the bridge
                        "ipMasq": False,
                        "hairpinMode": True,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": str(node.subnet)}]],
                            # The API server's Service address, through the host.
                            "routes": [{"dst": f"{API_SERVICE_IP}/32"}],
                        },
                    }
                ],
            },
            indent=2,
        )
    )
    # The bridge exists before the first pod (the plugin takes it as it finds it), so that
    # the host's address on it can be bound to from the start.
    _create_bridge(node.bridge, node.gateway, node.subnet)
    _ip("addr", "add", f"{API_SERVICE_IP}/32", "dev", node.bridge)
    api_port = int(cp.server.rpartition(":")[2])
    node._relay = _Relay((str(API_SERVICE_IP), API_SERVICE_PORT), ("127.0.0.1", api_port))
    config = w / "containerd.toml"
    config.write_text(_containerd_config(node.tools["cni"], w / "cni"))
    resolv = w / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")  # pods resolve nothing: there is no DNS

    # containerd, in a new mount namespace with the node's directories over the host's.
    # containerd's images and snapshots on a tmpfs (about twice the images' size in
    # memory, while the node runs): they vanish with the namespace, with nothing to delete.
    (w / "var-lib" / "containerd").mkdir(exist_ok=True)
    mounts = " && ".join(
        [
            *(
                f"mount --bind {w / src} {dst}"
                for src, dst in (("var-lib", "/var/lib"), ("var-log", "/var/log"), ("run", "/run"))
            ),
            "mount -t tmpfs -o mode=0711 containerd /var/lib/containerd",
        ]
    )
    containerd = _spawn(
        node,
        "containerd",
        [
            str(node.tools["unshare"]),
            "--mount",
            "--propagation=private",
            "--",
            "/bin/sh",
            "-c",
            f'{mounts} && exec "$0" --config "$1"',
            str(node.tools["containerd"]),
            str(config),
        ],
    )
    own_ns = os.readlink("/proc/self/ns/mnt")

    def in_own_namespace() -> bool:
        with contextlib.suppress(OSError):
            node._mount_ns = os.readlink(f"/proc/{containerd.process.pid}/ns/mnt")
        exe = ""
        with contextlib.suppress(OSError):
            exe = os.readlink(f"/proc/{containerd.process.pid}/exe")
        return node._mount_ns not in ("", own_ns) and exe.endswith("containerd")

    _wait(node, deadline, "containerd in its mount namespace", in_own_namespace)
    _wait(node, deadline, "containerd's socket", lambda: _ctr_ok(node))
    node.timings["containerd"] = round(time.monotonic() - t0, 3)

    for archive in (node.tools["pause"], *images):
        node.import_image(archive)
    node.timings["images"] = round(time.monotonic() - t0, 3)

    kubelet_port, healthz_port = _free_ports(2)
    _spawn(
        node,
        "kubelet",
        [
            str(node.tools["nsenter"]),
            f"--target={containerd.process.pid}",
            "--mount",
            "--",
            str(node.tools["kubelet"]),
            f"--kubeconfig={cp.kubeconfig_path}",
            "--container-runtime=remote",
            f"--container-runtime-endpoint=unix://{_CONTAINERD_SOCKET}",
            f"--hostname-override={NODE_NAME}",
            "--address=127.0.0.1",
            f"--port={kubelet_port}",
            "--read-only-port=0",
            "--healthz-bind-address=127.0.0.1",
            f"--healthz-port={healthz_port}",
            "--cgroup-driver=cgroupfs",
            f"--cgroup-root=/{node.cgroup_root}",
            f"--pod-infra-container-image={PAUSE_IMAGE}",
            f"--resolv-conf={resolv}",
            "--make-iptables-util-chains=false",
            "--fail-swap-on=false",
            "--oom-score-adj=0",  # no CAP_SYS_RESOURCE here to lower its own
            "--volume-plugin-dir=/var/lib/kubelet/volume-plugins",
            # A shared machine: evict nothing, collect no images the tests imported.
            "--eviction-hard=memory.available<32Mi,nodefs.available<1%,imagefs.available<1%",
            "--image-gc-high-threshold=100",
            "--image-gc-low-threshold=99",
            "--serialize-image-pulls=false",
            "--node-status-update-frequency=4s",
            "--sync-frequency=10s",
            "--node-labels=edgefleet.io/real-node=true",
            "--v=2",
        ],
    )
    _wait(
        node,
        deadline,
        "the kubelet's /healthz",
        lambda: _http_ok(f"http://127.0.0.1:{healthz_port}/healthz"),
    )
    node.timings["kubelet"] = round(time.monotonic() - t0, 3)

    _spawn(
        node,
        "node-lifecycle",
        [
            str(kube_binaries() / "kube-controller-manager"),
            f"--kubeconfig={cp.kubeconfig_path}",
            "--controllers=nodelifecycle",
            "--leader-elect=false",
            "--secure-port=0",
            "--port=0",
            "--node-monitor-period=2s",
            # Its default, /usr/libexec/kubernetes/..., would be created on the host.
            f"--flex-volume-plugin-dir={node.workdir / 'flex-volume'}",
            "--v=1",
        ],
    )
    _wait(node, deadline, "the node Ready with no not-ready taint", lambda: _node_ready(node))
    # The kubelet set its sysctls while starting and does not look at them again.
    _restore_sysctls({k: v for k, v in node.saved_sysctls.items() if k in KERNEL_SYSCTLS})
    node.timings["ready"] = round(time.monotonic() - t0, 3)


def _containerd_config(cni_bin: Path, cni_conf: Path) -> str:
    # restrict_oom_score_adj: this machine denies CAP_SYS_RESOURCE, so runc cannot lower a
    # sandbox's oom_score_adj below its own; without it every sandbox fails with "can't get
    # final child's PID from pipe: EOF".
    return f"""version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
oom_score = 0

[grpc]
  address = "{_CONTAINERD_SOCKET}"

[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd-opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"""


# --- processes -------------------------------------------------------------------------


def _hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 controllers, name=systemd, the hybrid unified)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            mount = Path(fields[4])
            if fstype in ("cgroup", "cgroup2") and mount.parent == CGROUP_FS:
                out.append(mount)
    return sorted(set(out))


def _make_cgroup_tree(root: str) -> None:
    for h in _hierarchies():
        for path in (h / root, h / root / RUNTIME_CGROUP):
            path.mkdir(exist_ok=True)
            if (h / "cpuset.cpus").exists():
                # A new v1 cpuset is empty: no task may join it until it has CPUs and nodes.
                for name in ("cpuset.cpus", "cpuset.mems"):
                    (path / name).write_text((h / name).read_text())


def _join_cgroup_tree(root: str) -> Callable[[], None]:
    targets = [str(h / root / RUNTIME_CGROUP / "cgroup.procs") for h in _hierarchies()]

    def join() -> None:
        # In the child between fork and exec: into the node's cgroups (every process it
        # starts inherits them, containerd's shims too), and SIGKILL when the test dies.
        pid = str(os.getpid())
        for target in targets:
            with contextlib.suppress(OSError), open(target, "w") as f:
                f.write(pid)
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return join


def _spawn(node: Node, name: str, argv: list[str]) -> _Process:
    log_path = node.logs_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_join_cgroup_tree(node.cgroup_root),
            close_fds=True,
        )
    p = _Process(name=name, process=proc, log_path=log_path)
    node._processes.append(p)
    return p


def _cgroup_pids(root: str) -> set[int]:
    pids: set[int] = set()
    for h in _hierarchies():
        base = h / root
        if not base.is_dir():
            continue
        for procs in base.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in procs.read_text().split())
    return pids


def _kill_cgroup_tree(
    root: str, *, timeout: float, reap: Sequence[subprocess.Popen[bytes]] = ()
) -> list[int]:
    """SIGKILL every process in the node's cgroups (containers, shims, runtime) until none
    is left; the pids still there after ``timeout``. ``reap``: this process's children
    among them, whose zombies stay in the cgroups until they are waited for."""
    deadline = time.monotonic() + timeout
    while True:
        for child in reap:
            child.poll()
        pids = _cgroup_pids(root)
        if not pids or time.monotonic() > deadline:
            return sorted(pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _remove_cgroup_tree(root: str) -> list[str]:
    problems = []
    for h in _hierarchies():
        base = h / root
        if not base.is_dir():
            continue
        # Deepest first; a just-emptied cgroup may refuse rmdir for a moment.
        dirs = sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, base]:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            if d.exists():
                problems.append(f"cgroup {d} could not be removed")
    return problems


def _sweep_stale() -> None:
    """Undo the nodes of test processes that died without stopping them."""
    pattern = re.compile(rf"^{CGROUP_PREFIX}(\d+)-[0-9a-f]+$")
    memory = CGROUP_FS / "memory"
    for path in memory.glob(f"{CGROUP_PREFIX}*") if memory.is_dir() else ():
        m = pattern.match(path.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _kill_cgroup_tree(path.name, timeout=10.0)
            _remove_cgroup_tree(path.name)
    for name in _bridges():
        owner = name[len(BRIDGE_PREFIX) : len(BRIDGE_PREFIX) + 7]
        with contextlib.suppress(ValueError):
            if not Path(f"/proc/{int(owner, 16)}").exists():
                _delete_bridge(name)


# --- network ---------------------------------------------------------------------------


def _bridges() -> list[str]:
    out = subprocess.run(
        ["ip", "-j", "link", "show", "type", "bridge"], capture_output=True, check=False
    ).stdout
    try:
        links = json.loads(out or b"[]")
    except ValueError:
        return []
    return [
        str(link["ifname"])
        for link in links
        if re.fullmatch(rf"{BRIDGE_PREFIX}[0-9a-f]{{9}}", str(link.get("ifname", "")))
    ]


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _create_bridge(
    name: str, address: ipaddress.IPv4Address, subnet: ipaddress.IPv4Network
) -> None:
    _ip("link", "add", "name", name, "type", "bridge")
    _ip("addr", "add", f"{address}/{subnet.prefixlen}", "dev", name)
    _ip("link", "set", name, "up")


class _Relay:
    """Forwards every TCP connection to ``listen`` to ``target``, both ways, in threads of
    the test process: kube-proxy's rule for one Service, without iptables."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self._target = target
        self._server = socket.create_server(listen)
        self._server.settimeout(0.2)  # accept() wakes up to see close()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="api-relay", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5.0)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._connection, args=(client, upstream), daemon=True).start()

    def _connection(self, client: socket.socket, upstream: socket.socket) -> None:
        there = threading.Thread(target=self._pipe, args=(client, upstream), daemon=True)
        there.start()
        self._pipe(upstream, client)
        there.join()
        with self._lock:
            self._open.difference_update((client, upstream))
        client.close()
        upstream.close()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5.0)
        self._server.close()
        with self._lock:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._open.clear()


def _delete_bridge(name: str) -> list[str]:
    if name not in _bridges():
        return []
    subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)
    return [f"bridge {name} could not be deleted"] if name in _bridges() else []


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10.88.0.0/16 that no route of the machine overlaps."""
    out = subprocess.run(
        ["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, check=False
    ).stdout
    used: list[ipaddress.IPv4Network] = []
    for route in json.loads(out or b"[]"):
        dst = route.get("dst", "")
        with contextlib.suppress(ValueError):
            if dst and dst != "default":
                used.append(ipaddress.IPv4Network(dst, strict=False))
    candidates = list(POD_SUBNETS.subnets(new_prefix=24))
    random.shuffle(candidates)
    for net in candidates:
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError(f"no free /24 in {POD_SUBNETS} for the pods")


# --- sysctls ---------------------------------------------------------------------------


def _read_sysctls() -> dict[str, str]:
    out = {}
    for key in SYSCTLS:
        with contextlib.suppress(OSError):
            out[key] = Path("/proc/sys", key).read_text().strip()
    return out


def _restore_sysctls(saved: dict[str, str]) -> list[str]:
    problems = []
    for key, value in saved.items():
        path = Path("/proc/sys", key)
        try:
            if path.read_text().strip() != value:
                path.write_text(value)
        except OSError as exc:
            problems.append(f"sysctl {key} could not be restored to {value}: {exc}")
    return problems


# --- waiting ---------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held open while they are chosen)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(n):
            s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
    return ports


def _wait(node: Node, deadline: float, what: str, check: Callable[[], bool]) -> None:
    delay = 0.05
    while True:
        for p in node._processes:
            code = p.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"real node: {p.name} exited with code {code} while waiting for {what}\n"
                    f"{node.log_tails()}"
                )
        if check():
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"real node: timed out waiting for {what}\n{node.log_tails()}")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def _ctr_ok(node: Node) -> bool:
    try:
        node.ctr("version", timeout=10.0)
    except (RuntimeError, subprocess.TimeoutExpired):
        return False
    return True


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            return int(resp.status) == 200
    except OSError:
        return False


def _node_ready(node: Node) -> bool:
    core: Any = k8s.CoreV1Api(node.control_plane.api_client())
    try:
        obj = core.read_node(node.name)
    except ApiException:
        return False
    ready = any(c.type == "Ready" and c.status == "True" for c in (obj.status.conditions or []))
    tainted = any(t.key == "node.kubernetes.io/not-ready" for t in (obj.spec.taints or []))
    return ready and not tainted


def _tail(name: str, path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        text = [f"<no log: {exc}>"]
    body = "\n".join(f"    {line}" for line in text)
    return f"--- {name} ({path}), last {lines} lines:\n{body}"


@contextlib.contextmanager
def running_node(
    control_plane: ControlPlane, workdir: Path, *, images: tuple[Path, ...] = ()
) -> Iterator[Node]:
    """A node for a ``with`` block; leaving it raises if anything was left behind."""
    node = start_node(control_plane, workdir, images=images)
    try:
        yield node
    finally:
        problems = node.stop()
        if problems:
            raise RuntimeError("the real node left things behind: " + "; ".join(problems))
