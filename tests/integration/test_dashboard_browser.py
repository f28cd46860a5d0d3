"""The /dashboard page in headless Chromium against a live gateway with traffic.

Needs Debian's ``chromium`` (``.ci/run`` installs it). The screenshot is kept in
``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=6000",
    "--window-size=1280,900",
]


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed")
def test_dashboard_shows_the_hit_rate_of_stats(gateway_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert CHROMIUM is not None, "CI must install chromium (apt-get install chromium)"
    live = gateway_factory()
    texts = [f"dashboard text {i}" for i in range(12)]
    httpx.post(f"{live.url}/v1/embeddings", json={"input": texts})
    httpx.post(f"{live.url}/v1/embeddings", json={"input": texts[:5]})
    httpx.post(f"{live.url}/v1/embeddings", json={"input": [*texts[:9], "one more"]})
    stats = httpx.get(f"{live.url}/stats").json()
    expected = f"{stats['cache']['hit_rate'] * 100:.1f}%"
    assert expected not in ("0.0%", "100.0%"), "traffic must mix hits and misses"

    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, *profile, "--dump-dom", f"{live.url}/dashboard"],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    ).stdout
    shown = re.search(r'id="hit-rate">([^<]*)<', dom)
    assert shown is not None, dom[:2000]
    assert shown.group(1) == expected

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "dashboard.png"
    subprocess.run(
        [CHROMIUM, *FLAGS, *profile, f"--screenshot={screenshot}", f"{live.url}/dashboard"],
        capture_output=True,
        timeout=90,
        check=True,
    )
    assert screenshot.stat().st_size > 10_000


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed")
def test_dashboard_opened_after_traffic_draws_the_past(gateway_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The page is opened only after the traffic: its charts come from /stats/history, not from polling."""
    assert CHROMIUM is not None, "CI must install chromium (apt-get install chromium)"
    live = gateway_factory(history_interval_s=0.2, history_samples=100)
    for i in range(14):  # about 3 s of mixed hits and misses
        httpx.post(f"{live.url}/v1/embeddings", json={"input": [f"history text {i}", f"history text {i // 2}"]})
        time.sleep(0.2)
    time.sleep(0.5)
    stats = httpx.get(f"{live.url}/stats").json()
    history = httpx.get(f"{live.url}/stats/history").json()
    assert len(history["samples"]) >= 10
    assert sum(sample["requests"] for sample in history["samples"]) == stats["requests"]["total"] == 14

    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, *profile, "--dump-dom", f"{live.url}/dashboard"],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    ).stdout
    points = dict(re.findall(r'<canvas id="(c-[a-z]+)"[^>]*data-points="(\d+)"', dom))
    for chart in ("c-hit", "c-rps", "c-tps", "c-lat", "c-batch", "c-queue", "c-err"):
        assert int(points.get(chart, 0)) >= 10, (chart, points, re.findall(r"<canvas[^>]*>", dom))
    tiles = dict(re.findall(r'id="(hit-rate|requests|errors)">([^<]*)<', dom))
    assert tiles["hit-rate"] == f"{stats['cache']['hit_rate'] * 100:.1f}%"
    assert tiles["requests"] == str(stats["requests"]["total"])
    assert tiles["errors"] == f"{stats['requests']['errors']} / {stats['cache']['errors']}"

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "dashboard-history.png"
    subprocess.run(
        [CHROMIUM, *FLAGS, *profile, f"--screenshot={screenshot}", f"{live.url}/dashboard"],
        capture_output=True,
        timeout=90,
        check=True,
    )
    assert screenshot.stat().st_size > 10_000
