"""The /dashboard page in headless Chromium against a live gateway with traffic.

Needs Debian's ``chromium`` (``.ci/run`` installs it). The screenshots are kept in
``test-artifacts/`` (``dashboard.png``, ``dashboard-history.png``, ``dashboard-keys.png``): look at
them, they are the check of what the charts look like. The page writes what it drew on each canvas
(``data-points``, ``data-ticks``: the y-axis labels, bottom first) and a chart with nothing to draw
says why in its ``.note``, so the DOM dumped by Chromium holds what an operator sees.
"""

from __future__ import annotations

import html
import itertools
import math
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
    "--window-size=1280,1200",  # the whole page, the per-key panel at the bottom included
]
CHARTS = ("c-hit", "c-rps", "c-tps", "c-lat", "c-batch", "c-queue", "c-err", "c-keys")
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed")


def _chromium(profile: Path, url: str, *args: str) -> str:
    assert CHROMIUM is not None, "CI must install chromium (apt-get install chromium)"
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    ).stdout


def _screenshot(profile: Path, url: str, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / name
    _chromium(profile, url, f"--screenshot={screenshot}")
    assert screenshot.stat().st_size > 10_000


def _charts(dom: str) -> dict[str, dict[str, str]]:
    """Each canvas' ``data-*`` attributes and its panel's note, by canvas id."""
    charts: dict[str, dict[str, str]] = {}
    for panel in re.findall(r'<div class="chart">(.*?)</div>', dom, re.S):
        canvas = re.search(r"<canvas[^>]*>", panel)
        assert canvas is not None, panel
        attributes = {k: html.unescape(v) for k, v in re.findall(r'([a-z-]+)="([^"]*)"', canvas.group(0))}
        note = re.search(r'<p class="note"[^>]*>([^<]*)<', panel)
        attributes["note"] = html.unescape(note.group(1)) if note else ""
        legend = re.search(r'<span class="legend"[^>]*>(.*?)</span></h2>', panel, re.S)
        attributes["legend"] = re.sub(r"<[^>]+>", " ", legend.group(1)) if legend else ""
        charts[attributes["id"]] = attributes
    assert set(charts) == set(CHARTS), (sorted(charts), dom[:3000])
    return charts


def _value(label: str) -> float:
    """A tick label's number: ``2.5k`` is 2500, ``75%`` is 75."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kM%]?)", label)
    assert match is not None, f"tick label {label!r} is not a plain number"
    return float(match.group(1)) * {"k": 1e3, "M": 1e6}.get(match.group(2), 1.0)


def _assert_round_axis(chart: str, ticks: list[str]) -> None:
    """Distinct labels from 0 up in equal steps of 1, 2, 2.5 or 5 times a power of ten."""
    assert ticks, f"{chart}: no y-axis ticks"
    assert len(set(ticks)) == len(ticks), f"{chart}: repeated tick labels {ticks}"
    values = [_value(tick) for tick in ticks]
    assert values[0] == 0, (chart, ticks)
    if len(values) == 1:
        return
    steps = {round(b - a, 9) for a, b in itertools.pairwise(values)}
    assert len(steps) == 1, f"{chart}: uneven ticks {ticks}"
    step = steps.pop()
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5)), f"{chart}: ticks {ticks} are not round"


@needs_chromium
def test_dashboard_shows_the_hit_rate_of_stats(gateway_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Opened before the first history sample: the tiles show /stats, the charts say they wait for a sample."""
    live = gateway_factory()
    texts = [f"dashboard text {i}" for i in range(12)]
    httpx.post(f"{live.url}/v1/embeddings", json={"input": texts})
    httpx.post(f"{live.url}/v1/embeddings", json={"input": texts[:5]})
    httpx.post(f"{live.url}/v1/embeddings", json={"input": [*texts[:9], "one more"]})
    stats = httpx.get(f"{live.url}/stats").json()
    expected = f"{stats['cache']['hit_rate'] * 100:.1f}%"
    assert expected not in ("0.0%", "100.0%"), "traffic must mix hits and misses"
    assert httpx.get(f"{live.url}/stats/history").json()["samples"] == []

    dom = _chromium(tmp_path / "profile", f"{live.url}/dashboard", "--dump-dom")
    shown = re.search(r'id="hit-rate">([^<]*)<', dom)
    assert shown is not None, dom[:2000]
    assert shown.group(1) == expected
    for chart, drawn in _charts(dom).items():
        # not empty axes labelled "0.0" five times and "last 0 s"
        assert drawn.get("data-ticks", "") == "", (chart, drawn)
        assert "waiting for the first sample" in drawn["note"], (chart, drawn)

    _screenshot(tmp_path / "profile", f"{live.url}/dashboard", "dashboard.png")


@needs_chromium
def test_dashboard_opened_after_traffic_draws_the_past(gateway_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The page is opened only after the traffic: its charts come from /stats/history, not from polling."""
    live = gateway_factory(history_interval_s=0.2, history_samples=100)
    for i in range(14):  # about 3 s of mixed hits and misses
        httpx.post(f"{live.url}/v1/embeddings", json={"input": [f"history text {i}", f"history text {i // 2}"]})
        time.sleep(0.2)
    time.sleep(0.5)
    stats = httpx.get(f"{live.url}/stats").json()
    history = httpx.get(f"{live.url}/stats/history").json()
    assert len(history["samples"]) >= 10
    assert sum(sample["requests"] for sample in history["samples"]) == stats["requests"]["total"] == 14
    assert stats["requests"]["errors"] == 0 and not any(sample["errors"] for sample in history["samples"])
    assert stats.get("keys", {}) == {}, "no named keys in this test"

    dom = _chromium(tmp_path / "profile", f"{live.url}/dashboard", "--dump-dom")
    charts = _charts(dom)
    for chart in ("c-hit", "c-rps", "c-tps", "c-lat", "c-batch", "c-queue", "c-err"):
        drawn = charts[chart]
        assert int(drawn.get("data-points", 0)) >= 10, (chart, drawn)
        _assert_round_axis(chart, drawn.get("data-ticks", "").split())
        assert drawn["note"] == "", (chart, drawn)
    # a hit rate runs from 0 to 100 %, not to 110 % (or to 1.1 times the highest sample)
    assert charts["c-hit"]["data-ticks"].split() == ["0%", "25%", "50%", "75%", "100%"]
    # an all-zero chart: one "0" at the baseline and a count scale above it, not "0.0" on every tick
    assert charts["c-err"]["data-ticks"].split() == ["0", "1"]
    # counts never get fractional ticks
    for chart in ("c-queue", "c-err"):
        assert all("." not in tick for tick in charts[chart]["data-ticks"].split()), charts[chart]
    # no named keys: the per-key panel says so instead of drawing empty axes
    keys = charts["c-keys"]
    assert keys.get("data-ticks", "") == "" and keys.get("data-points", "0") == "0", keys
    assert "no named api keys" in keys["note"].lower(), keys
    assert "EMBED_API_KEYS_FILE" in keys["note"], keys

    tiles = dict(re.findall(r'id="(hit-rate|requests|errors)">([^<]*)<', dom))
    assert tiles["hit-rate"] == f"{stats['cache']['hit_rate'] * 100:.1f}%"
    assert tiles["requests"] == str(stats["requests"]["total"])
    assert tiles["errors"] == f"{stats['requests']['errors']} / {stats['cache']['errors']}"

    _screenshot(tmp_path / "profile", f"{live.url}/dashboard", "dashboard-history.png")


@needs_chromium
def test_dashboard_charts_requests_by_named_key(gateway_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With named keys the per-key panel draws one line per name, with the names in its legend."""
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(
        '[[keys]]\nname = "ingest"\nkey = "sk-ingest-dashboard"\n\n[[keys]]\nname = "search"\nkey = "sk-search-dashboard"\n',
        encoding="utf-8",
    )
    # /dashboard itself takes no Authorization header from a browser: EMBED_PUBLIC_METRICS opens it
    live = gateway_factory(
        history_interval_s=0.2, history_samples=100, api_keys_file=str(keys_file), public_metrics=True
    )
    for i in range(12):
        key = "sk-ingest-dashboard" if i % 3 else "sk-search-dashboard"
        response = httpx.post(
            f"{live.url}/v1/embeddings",
            json={"input": [f"keyed text {i}"]},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert response.status_code == 200, response.text
        time.sleep(0.2)
    time.sleep(0.5)
    stats = httpx.get(f"{live.url}/stats").json()
    assert sorted(stats["keys"]) == ["ingest", "search"]

    url = f"{live.url}/dashboard"
    dom = _chromium(tmp_path / "profile", url, "--dump-dom")
    keys = _charts(dom)["c-keys"]
    assert int(keys.get("data-points", 0)) >= 10, keys
    assert keys["note"] == "", keys
    assert keys["legend"].split() == ["ingest", "search"], keys
    _assert_round_axis("c-keys", keys.get("data-ticks", "").split())
    assert all("." not in tick for tick in keys["data-ticks"].split()), keys

    _screenshot(tmp_path / "profile", url, "dashboard-keys.png")
