"""The dashboard in a real browser: Debian's chromium driven by Playwright, against the
app under uvicorn on committed transactions (the pages' streams read from connections of
their own). Pages load without console errors, a rollout's page follows its waves without
reloading, the links lead from the fleet to a rollout, a node, a model and a site's nodes.

Screenshots are saved as test artifacts; with EDGEFLEET_SCREENSHOTS set (scripts/screenshots)
into that directory instead: the README's pictures come from these tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, Page, expect

from controller.rollouts import reconciler
from controller.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.dashboard.browser import TIMEOUT_MS, chromium, sign_in, watch_errors
from tests.live import live_controller
from tests.rollouts.helpers import (
    apply,
    cluster_doc,
    push_versions,
    report,
    rollout_doc,
    rollout_id,
    wave_phases,
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture
def server(committed_client: TestClient, settings: Settings, sim_fleet: None) -> Iterator[str]:
    """The API on a loopback port, its live pages re-rendered every 0.2 s."""
    app = committed_client.app
    app.state.settings = settings.model_copy(  # type: ignore[attr-defined]
        update={"dashboard_live_interval_s": 0.2, "dashboard_live_stream_s": 20.0}
    )
    with live_controller(app) as controller:  # type: ignore[arg-type]
        yield controller.url


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    """A signed-in page that fails the test on any console error or uncaught exception."""
    context = browser.new_context(base_url=server, viewport={"width": 1100, "height": 760})
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    errors = watch_errors(tab)
    sign_in(tab, server, ADMIN_TOKEN)
    yield tab
    context.close()  # the pages' streams end with it, before the server stops
    assert errors == []


def shot(page: Page, name: str, tmp_path: Path) -> Path:
    """A screenshot, under EDGEFLEET_SCREENSHOTS (the README's) or the test's own dir."""
    root = Path(os.environ.get("EDGEFLEET_SCREENSHOTS") or tmp_path)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def fleet(client: TestClient) -> None:
    resp = apply(client, cluster_doc("berlin", 6), cluster_doc("paris", 4))
    assert resp.status_code == 200, resp.text
    push_versions(client, "1.0.0", "2.0.0")


def step(name: str, settings: Settings, *, p95_ms: float = 12.0) -> str:
    """One reconcile step, then every running node reports (as its agent would)."""
    phase = reconciler.reconcile(rollout_id(name), settings)
    assert phase is not None
    report(lambda _: (p95_ms, 0))
    return phase


def live_marker(page: Page) -> None:
    """Set on the page's window: gone if the page reloads."""
    page.evaluate("window.__notReloaded = true")


def expect_not_reloaded(page: Page) -> None:
    assert page.evaluate("window.__notReloaded === true")


def test_a_rollout_page_follows_its_waves_and_its_rollback_live(
    page: Page, committed_client: TestClient, settings: Settings, server: str, tmp_path: Path
) -> None:
    fleet(committed_client)
    slow_canary = {"gates": {"maxP95LatencyMs": 40, "maxErrorRate": 0.01, "minSamples": 20}}
    assert apply(committed_client, rollout_doc("good", "1.0.0")).status_code == 200
    page.goto("/rollouts/good")
    expect(page.locator("#live-status")).to_have_text("live")
    live_marker(page)
    waves = page.locator("#waves tr")
    expect(waves.nth(1).locator("td").nth(1)).to_have_text(wave_phases("good")[0])
    expect(waves.nth(2).locator("td").nth(1)).to_have_text("Pending")
    # The canary wave passes its gate; the page shows it without reloading.
    while wave_phases("good")[0] != "Passed":
        step("good", settings)
    expect(waves.nth(1).locator("td").nth(1)).to_have_text("Passed")
    expect(page.locator("#gate-plot rect.p95")).to_have_count(1)
    expect_not_reloaded(page)
    while step("good", settings) in ("Pending", "Progressing"):
        pass
    expect(page.locator("h1 .tag")).to_have_text("Succeeded")
    expect(page.locator("#gate-plot rect.p95")).to_have_count(3)
    shot(page, "rollout", tmp_path)

    # A second version whose canary is ten times over its gate: rolled back, live.
    assert apply(committed_client, rollout_doc("slow", "2.0.0", **slow_canary)).status_code == 200
    page.goto("/rollouts/slow")
    expect(page.locator("#live-status")).to_have_text("live")
    live_marker(page)
    while step("slow", settings, p95_ms=400.0) in ("Pending", "Progressing"):
        pass
    expect(page.locator("h1 .tag")).to_have_text("RolledBack")
    bar = page.locator("#gate-plot rect.p95")
    expect(bar).to_have_count(1)
    assert bar.get_attribute("data-p95") == "400"
    expect(page.locator("#events")).to_contain_text("GateFailed")
    expect_not_reloaded(page)


def test_from_the_fleet_to_a_rollout_a_node_and_a_model(
    page: Page, committed_client: TestClient, settings: Settings, server: str, tmp_path: Path
) -> None:
    fleet(committed_client)
    assert apply(committed_client, rollout_doc("good", "1.0.0")).status_code == 200
    while step("good", settings) in ("Pending", "Progressing"):
        pass
    page.goto("/")
    expect(page.locator("#live-status")).to_have_text("live")
    expect(page.locator("#sites tr")).to_have_count(3)  # the header, berlin, paris
    shot(page, "fleet", tmp_path)

    page.locator("#rollouts").get_by_role("link", name="good").click()
    expect(page).to_have_url(f"{server}/rollouts/good")
    page.locator("#nodes").get_by_role("link", name="berlin-n0").click()
    expect(page).to_have_url(f"{server}/clusters/berlin/nodes/berlin-n0")
    expect(page.locator("h1")).to_contain_text("berlin-n0")
    expect(page.locator("#workloads tr").nth(1)).to_contain_text("Healthy")
    expect(page.locator("#live-status")).to_have_text("live")

    page.locator("#workloads").get_by_role("link", name="detector").click()
    expect(page).to_have_url(f"{server}/models/detector")
    expect(page.locator("#versions tr")).to_have_count(3)  # the header, 1.0.0, 2.0.0
    expect(page.locator("#live-status")).to_have_text("live")

    # A site of the grid lists its nodes.
    page.goto("/")
    page.locator("#sites").get_by_role("link", name="paris").nth(1).click()
    expect(page).to_have_url(f"{server}/clusters/paris?site=paris")
    expect(page.locator("#nodes tr")).to_have_count(5)  # the header, 4 nodes
    page.locator("#nodes").get_by_role("link", name="paris-n3").click()
    expect(page).to_have_url(f"{server}/clusters/paris/nodes/paris-n3")
