"""The /dashboard page in headless Chromium against a live gateway with traffic.

Needs Debian's ``chromium`` (``.ci/run`` installs it). The screenshot is kept in
``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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
