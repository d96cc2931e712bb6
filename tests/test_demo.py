"""The README's first command, on embedded defaults: SQLite, in-process tasks, the
simulated fleet, the dashboard. Run as a user would, in a fresh directory."""

from __future__ import annotations

import os
import pty
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml
from playwright.sync_api import expect

from tests.dashboard.browser import TIMEOUT_MS, chromium, sign_in, watch_errors
from tests.live import free_port
from tests.test_dashboard import Page


def embedded_env(home: Path) -> dict[str, str]:
    """No EDGEFLEET_* settings, and a home of its own (the demo saves a CLI context)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.update({"NO_COLOR": "1", "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")})
    return env


def in_chromium(url: str, token: str) -> None:
    """The demo's pages in a real browser: each loads, goes live, logs no error."""
    with chromium() as browser:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors = watch_errors(page)
        sign_in(page, url, token)
        for path in ("/", "/rollouts/detector-1-2", "/models/detector", "/clusters/oslo"):
            page.goto(f"{url}{path}")
            expect(page.locator("#live-status")).to_have_text("live")
        page.close()
        assert errors == []


def test_demo_plays_the_scenario(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "controller.cli.main", "demo", "--no-serve", "--bake", "0s"],
        cwd=tmp_path,
        env=embedded_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / ".edgefleet" / "demo.db").is_file()
    assert list((tmp_path / ".edgefleet" / "artifacts" / "sha256").rglob("*"))
    lines = proc.stdout.splitlines()
    # The logs went to a file, named first and last; the terminal has none of them.
    logs = tmp_path / ".edgefleet" / "demo.log"
    assert lines[0] == lines[-1] == f"logs: {logs}"
    assert "succeeded in" in logs.read_text()  # every eager Celery task's line is there
    assert "celery" not in proc.stdout + proc.stderr
    assert proc.stderr == ""
    # A header per act, then one line per decision, with the gate's numbers.
    acts = [line.split(" · ")[0] for line in lines if line.startswith("Act ")]
    assert acts == ["Act 1", "Act 2", "Act 3", "Act 4"]
    story = [line.split()[1:3] for line in lines if line[:2].isdigit()]
    assert ["detector-1-1", "Succeeded"] in story
    assert ["detector-1-2", "GateFailed"] in story
    assert ["detector-1-2", "RollingBack"] in story
    assert ["detector:1.1.0-int8", "VariantDerived"] in story
    assert story.index(["detector-1-2", "GateFailed"]) < story.index(
        ["detector-1-2", "RollingBack"]
    )
    (failed,) = [line for line in lines if "GateFailed" in line]
    numbers = re.search(r"slowest p95 ([\d.]+) ms > gate ([\d.]+) ms", failed)
    assert numbers is not None, failed
    p95, limit = numbers.groups()
    assert float(p95) > float(limit)
    passed = [line for line in lines if "GatePassed" in line]
    # detector-1-1's four waves (the variant rollout's count depends on its variant mix).
    assert len([line for line in passed if " detector-1-1 " in line]) == 4
    assert all(" ms <= gate " in line for line in passed)
    # The summary: each rollout's phase and decisive numbers, what the variant bought.
    start = lines.index(next(line for line in lines if line.startswith("Summary ")))
    # A row per rollout, found by its name: a cell too wide for the terminal (the
    # variant rollout's versions when it ships both, "1.1.0 x10, 1.1.0-int8 x6") wraps
    # onto a line of its own.
    rows = {
        r.split()[0]: r.split()
        for r in lines[start + 2 :]
        if r.split()[:1] in (["detector-1-1"], ["detector-1-2"], ["detector-1-1-auto"])
    }
    assert rows["detector-1-1"][1:5] == ["Succeeded", "4", "of", "4"]
    # The heavier model fails a gate, on its canary or a later wave (its p95 is near it).
    assert rows["detector-1-2"][1] == "RolledBack"
    assert rows["detector-1-2"][2:5] in (["0", "of", "4"], ["1", "of", "4"])
    assert rows["detector-1-2"][5:7] == [p95, limit]
    assert rows["detector-1-1-auto"][1] == "Succeeded"
    assert re.match(
        r"detector 1\.1\.0-int8: static-int8 of 1\.1\.0: size x[\d.]+, p50 x", lines[-2]
    )
    # Two screens, and not buried under a line per Celery task (it was 440 lines).
    assert len(lines) < 80


def test_demo_serves_the_dashboard(tmp_path: Path) -> None:
    port = free_port()
    # On a terminal this time: the waves are drawn live while a rollout runs.
    terminal, tty = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller.cli.main", "demo", "--port", str(port), "--bake", "0s"],
        cwd=tmp_path,
        env=embedded_env(tmp_path) | {"COLUMNS": "120", "LINES": "40"},
        stdin=subprocess.DEVNULL,
        stdout=tty,
        stderr=tty,
        start_new_session=True,
    )
    os.close(tty)
    screen = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # EIO: the demo closed its terminal
                return
            if not chunk:
                return
            screen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / ".config" / "edgefleet" / "config.yaml"
    try:
        deadline = time.monotonic() + 120
        while not config.exists():
            assert time.monotonic() < deadline, "the demo never saved its CLI context"
            time.sleep(0.2)
        saved = yaml.safe_load(config.read_text())
        assert saved["current-context"] == "demo"
        (context,) = saved["contexts"]
        assert context["server"] == url
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        http = httpx.Client(
            base_url=url, timeout=5, headers={"Authorization": f"Bearer {context['token']}"}
        )
        while True:
            assert time.monotonic() < deadline, "the demo's server never answered healthy"
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        # Nothing is open but health: the demo's token is what the CLI and the page use.
        assert httpx.get(f"{url}/v1/rollouts", timeout=5).status_code == 401
        signin = httpx.get(f"{url}/", timeout=5)
        assert (signin.status_code, signin.headers["location"]) == (303, "/login")
        phases: dict[str, str] = {}
        while True:
            assert time.monotonic() < deadline, f"the scenario did not end: {phases}"
            try:
                items = http.get("/v1/rollouts").json()["items"]
                phases = {r["name"]: r["phase"] for r in items}
            except (httpx.TransportError, KeyError, ValueError):
                phases = {}
            if phases.get("detector-1-1-auto") in ("RolledBack", "Succeeded"):
                break
            time.sleep(0.5)
        # The browser's way in: sign in with the token, then the page is served.
        browser = httpx.Client(base_url=url, timeout=5)
        login = browser.post("/login", data={"token": context["token"]})
        assert (login.status_code, login.headers["location"]) == (303, "/")
        page = Page(browser.get("/").text)
        phases = {r["Name"]: r["Phase"] for r in page.rows("rollouts")}
        assert (phases["detector-1-1"], phases["detector-1-2"]) == ("Succeeded", "RolledBack")
        assert {r["Name"]: r["Driver"] for r in page.rows("clusters")}["oslo"] == "simulated"
        assert {r["Site"] for r in page.rows("sites")} == {"berlin", "paris", "oslo"}
        detail = Page(browser.get("/rollouts/detector-1-2").text)
        assert detail.rows("waves")[0]["Phase"] == "Failed"
        assert any(e.get("class") == "limit" for e in detail.elements["line"])
        in_chromium(url, context["token"])
        health = httpx.get(f"{url}/healthz", timeout=5)
        assert health.status_code == 200
        assert "embedded" in health.json()["checks"]["redis"]["mode"]
        rollouts = http.get("/v1/rollouts").json()
        assert {r["name"]: r["phase"] for r in rollouts["items"]} == {
            "detector-1-1": "Succeeded",
            "detector-1-2": "RolledBack",
            "detector-1-1-auto": "Succeeded",
        }
        # The CLI finds the controller and the token in the saved context.
        cli = subprocess.run(
            [sys.executable, "-m", "controller.cli.main", "get", "rollouts"],
            cwd=tmp_path,
            env=embedded_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "detector-1-1-auto" in cli.stdout
        # The per-node choice: each node class got one of the two, by its benchmarks.
        auto = http.get("/v1/rollouts/detector-1-1-auto").json()
        assert set(auto["versions"]) <= {"1.1.0", "1.1.0-int8"}
        assert sum(auto["versions"].values()) == 16
        for version in ("1.1.0", "1.1.0-int8"):
            rows = http.get(f"/v1/models/detector/versions/{version}/benchmarks").json()
            assert {r["node_class"] for r in rows} == {"amd64/none/unknown", "arm64/none/unknown"}
            assert {r["status"] for r in rows} == {"Succeeded"}
        variant = http.get("/v1/models/detector/versions/1.1.0-int8").json()
        assert variant["lineage"]["report"]["peak_memory"]["variant"]["peak_rss_bytes"] > 0
        nodes = http.get("/v1/nodes").json()
        assert nodes["total"] == 16
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        reader.join(10)
        os.close(terminal)
    shown = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", screen.decode(errors="replace"))
    assert "dashboard " + url in shown
    # The live table: the rollout's waves with their nodes' states and the gate.
    assert re.search(r"detector-1-1: (Progressing|Succeeded)", shown), shown[-2000:]
    assert re.search(r"wave\W+phase\W+nodes\W+states\W+slowest p95 ms\W+gate ms", shown)
