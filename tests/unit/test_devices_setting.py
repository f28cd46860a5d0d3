"""EMBED_DEVICES: one engine per entry, all of one kind, refused with one line otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gateway.settings import Settings, SettingsError


def test_a_comma_list_gives_one_engine_each_and_a_supervisor() -> None:
    settings = Settings.load({"EMBED_DEVICES": " cuda:0, cuda:0 ,cuda:1"})
    assert settings.engine_devices == ("cuda:0", "cuda:0", "cuda:1")
    assert settings.supervised


def test_without_it_one_engine_runs_on_embed_device_in_process() -> None:
    settings = Settings.load({"EMBED_DEVICE": "cpu"})
    assert settings.engine_devices == ("cpu",)
    assert not settings.supervised
    assert Settings.load({"EMBED_DEVICES": "cpu"}).supervised is False


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("cpu,cuda:0", "mixes kinds of device"),
        ("cpu,auto", "'auto' is not cpu, mps, cuda or cuda:N"),
        ("cuda:x", "'cuda:x' is not"),
        (",".join(["cpu"] * 17), "at most 16"),
    ],
)
def test_a_list_that_cannot_share_one_cache_namespace_is_refused(value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.load({"EMBED_DEVICES": value})


def test_serve_refuses_mixed_devices_in_one_line_before_loading_anything() -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("EMBED_")}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env={**env, "EMBED_DEVICES": "cpu,cuda:1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "EMBED_DEVICES" in lines[0] and "mixes kinds" in lines[0], lines
