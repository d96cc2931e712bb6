"""Hostile Cluster credentials: nothing a request sends is run or read on the controller.

Each refused field is checked through the API with a canary: ``exec`` and
``auth-provider`` entries would create a file, and every file-path field points at a
FIFO that records any attempt to open it (an open for reading would also block the
request), so "nothing executed, nothing read" is observed, not assumed."""

from __future__ import annotations

import base64
import contextlib
import copy
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from controller.kube.client import _configuration
from controller.kube.kubeconfig import KubeconfigRefused, parse_kubeconfig, server_allowed
from controller.manifests.builders import document
from controller.settings import Settings
from tests.rollouts.helpers import apply

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
# Nothing listens on port 1: a driver that is built connects, fails, and says so.
SERVER = "https://127.0.0.1:1"
LOC = ["body", 0, "spec", "credentials", "kubeconfig"]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def kubeconfig(**user: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "edge", "cluster": {"server": SERVER, "certificate-authority-data": b64(PEM)}}
        ],
        "users": [{"name": "ctl", "user": user or {"token": "t0ken"}}],
        "contexts": [{"name": "edge", "context": {"cluster": "edge", "user": "ctl"}}],
        "current-context": "edge",
    }


def cluster(config: dict[str, Any] | None = None, **credentials: Any) -> dict[str, Any]:
    creds = credentials or {"kubeconfig": yaml.safe_dump(config)}
    return document("Cluster", "remote", {"driver": "kubernetes", "credentials": creds})


class Canaries:
    """A file that a command would create, and a FIFO that notices being opened."""

    def __init__(self, root: Path) -> None:
        self.created = root / "pwned"
        self.fifo = root / "secret.fifo"
        os.mkfifo(self.fifo)
        self.opened = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        # Opening a FIFO for writing without blocking succeeds only while a reader has
        # it open: then we know it was read, and unblock the reader.
        while not self._stop.wait(0.005):
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue
            self.opened.set()
            with contextlib.suppress(OSError):
                os.write(fd, b"x")
            os.close(fd)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def untouched(self) -> bool:
        return not self.created.exists() and not self.opened.is_set()


@pytest.fixture
def canaries(tmp_path: Path) -> Iterator[Canaries]:
    c = Canaries(tmp_path)
    yield c
    c.close()


def hostile(canaries: Canaries) -> dict[str, tuple[dict[str, Any], str]]:
    """name -> (kubeconfig, the field path the error must name)."""
    touch = f"touch {canaries.created}; echo '{{}}'"
    fifo = str(canaries.fifo)
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "exec": (
            kubeconfig(
                exec={
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "command": "/bin/sh",
                    "args": ["-c", touch],
                }
            ),
            "users[0].user.exec",
        ),
        "auth-provider": (
            kubeconfig(
                **{
                    "auth-provider": {
                        "name": "gcp",
                        "config": {"cmd-path": "/bin/sh", "cmd-args": f"-c '{touch}'"},
                    }
                }
            ),
            "users[0].user.auth-provider",
        ),
        "tokenFile": (kubeconfig(tokenFile=fifo), "users[0].user.tokenFile"),
        "client-certificate": (
            kubeconfig(**{"client-certificate": fifo, "client-key": fifo}),
            "users[0].user.client-certificate",
        ),
        "basic-auth": (kubeconfig(username="u", password="p"), "users[0].user.password"),
        "unknown": (kubeconfig(token="t", impersonate="x"), "users[0].user.impersonate"),
    }
    ca_file = kubeconfig()
    ca_file["clusters"][0]["cluster"] = {"server": SERVER, "certificate-authority": fifo}
    cases["certificate-authority"] = (ca_file, "clusters[0].cluster.certificate-authority")
    proxy = kubeconfig()
    proxy["clusters"][0]["cluster"]["proxy-url"] = "http://127.0.0.1:3128"
    cases["proxy-url"] = (proxy, "clusters[0].cluster.proxy-url")
    # A second, unused user is checked as well as the current context's.
    spare = kubeconfig()
    spare["users"].append({"name": "spare", "user": {"exec": {"command": "/bin/sh"}}})
    cases["exec-in-another-entry"] = (spare, "users[1].user.exec")
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "exec",
        "auth-provider",
        "tokenFile",
        "client-certificate",
        "certificate-authority",
        "proxy-url",
        "basic-auth",
        "unknown",
        "exec-in-another-entry",
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_hostile_kubeconfig_is_422_and_nothing_runs(
    client: TestClient, canaries: Canaries, case: str, dry_run: bool
) -> None:
    config, field = hostile(canaries)[case]
    resp = apply(client, cluster(config), dry_run=dry_run)
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    assert error["loc"] == LOC
    assert field in error["msg"], error["msg"]
    assert canaries.untouched(), "a hostile kubeconfig ran a command or opened a file"
    assert client.get("/v1/clusters").json() == []


def test_insecure_tls_needs_the_setting(client: TestClient, settings: Settings) -> None:
    config = kubeconfig()
    config["clusters"][0]["cluster"]["insecure-skip-tls-verify"] = True
    resp = apply(client, cluster(config), dry_run=True)
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == LOC
    assert "EDGEFLEET_CLUSTER_ALLOW_INSECURE_TLS" in resp.json()["detail"][0]["msg"]
    flat = cluster(token="t", insecureSkipTLSVerify=True)
    flat["spec"]["server"] = SERVER
    resp = apply(client, flat, dry_run=True)
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"][-1] == "insecureSkipTLSVerify"
    with changed(settings, cluster_allow_insecure_tls=True):
        assert apply(client, cluster(config), dry_run=True).status_code == 200
        assert apply(client, flat, dry_run=True).status_code == 200


@contextlib.contextmanager
def changed(settings: Settings, **values: Any) -> Iterator[None]:
    saved = {k: getattr(settings, k) for k in values}
    for k, v in values.items():
        setattr(settings, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(settings, k, v)


def test_the_server_allow_list(client: TestClient, settings: Settings) -> None:
    with changed(settings, cluster_server_allowlist=["127.0.0.1/32", "*.edge.example"]):
        resp = apply(client, cluster(kubeconfig()), dry_run=True)
        assert resp.status_code == 200, resp.text
        other = copy.deepcopy(kubeconfig())
        other["clusters"][0]["cluster"]["server"] = "https://127.0.0.2:6443"
        resp = apply(client, cluster(other), dry_run=True)
        assert resp.status_code == 422
        assert "allow-list" in resp.json()["detail"][0]["msg"]
        flat = cluster(token="t", caData=PEM)
        flat["spec"]["server"] = "https://127.0.0.2:6443"
        resp = apply(client, flat, dry_run=True)
        assert resp.json()["detail"][0]["loc"] == ["body", 0, "spec", "server"]


def test_allow_list_matching() -> None:
    allow = ["10.20.0.0/16", "*.edge.example", "k3s.lab"]
    assert server_allowed("https://10.20.3.4:6443", allow)
    assert server_allowed("https://a.edge.example", allow)
    assert server_allowed("https://K3S.lab.:6443", allow)
    assert not server_allowed("https://10.21.0.1", allow)
    assert not server_allowed("https://edge.example", allow)
    assert not server_allowed("https://evil-edge.example", allow)
    assert not server_allowed("https://a.edge.example.evil.com", allow)
    # Hostnames never match networks: where a name points may change after the check.
    assert not server_allowed("https://localhost", ["127.0.0.0/8"])
    assert not server_allowed("not a url", allow)


def test_the_local_driver_is_off_unless_enabled(client: TestClient, settings: Settings) -> None:
    doc = document(
        "Cluster", "here", {"driver": "local", "local": {"count": 1, "cacheDir": "/etc"}}
    )
    resp = apply(client, doc, dry_run=True)
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["body", 0, "spec", "driver"]
    assert "EDGEFLEET_LOCAL_DRIVER" in resp.json()["detail"][0]["msg"]


def test_accepted_kubeconfigs_build_a_client_from_inline_fields_only() -> None:
    cert = kubeconfig(**{"client-certificate-data": b64(PEM), "client-key-data": b64(KEY)})
    cert["clusters"][0]["cluster"]["tls-server-name"] = "k3s.internal"
    access = parse_kubeconfig(yaml.safe_dump(cert))
    assert (access.server, access.client_cert_pem, access.client_key_pem) == (SERVER, PEM, KEY)
    cfg = _configuration(None, {"kubeconfig": yaml.safe_dump(cert)}, 5)
    assert cfg.host == SERVER
    assert cfg.tls_server_name == "k3s.internal"
    for path in (cfg.cert_file, cfg.key_file, cfg.ssl_ca_cert):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        os.unlink(path)
    token = _configuration(None, {"kubeconfig": yaml.safe_dump(kubeconfig())}, 5)
    assert token.api_key == {"authorization": "t0ken"}
    assert token.verify_ssl is True
    os.unlink(token.ssl_ca_cert)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda c: c["users"][0]["user"].update({"client-certificate-data": b64(PEM)}),
            "go together",
        ),
        (lambda c: c["users"][0]["user"].clear(), "give token or client-certificate"),
        (lambda c: c.update({"current-context": "nope"}), "no entry named 'nope'"),
        (lambda c: c["clusters"][0]["cluster"].update({"server": "file:///etc"}), "https://"),
        (
            lambda c: c["clusters"][0]["cluster"].update({"certificate-authority-data": "%%"}),
            "not base64",
        ),
    ],
)
def test_malformed_kubeconfigs_say_what_is_wrong(mutate: Any, message: str) -> None:
    config = kubeconfig()
    mutate(config)
    with pytest.raises(KubeconfigRefused, match=message):
        parse_kubeconfig(yaml.safe_dump(config))
