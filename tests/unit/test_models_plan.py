"""Several models under the supervisor (issue 21): which engines it starts, and how a worker splits them.

The supervisor starts one engine per model and ``EMBED_DEVICES`` entry, model after model; a worker
splits the sockets it is given in that same order, one group (one router) per model. Each engine's
settings line names its own model, device and share of the cores.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec
import pytest

from gateway.core.telemetry import Telemetry
from gateway.engine.supervisor import Supervisor, _usable_cores
from gateway.http.app import _routers
from gateway.settings import Settings


def _models(server: Settings) -> list[Settings]:
    return [
        msgspec.structs.replace(server, model="/models/a", model_name="a"),
        msgspec.structs.replace(server, model="/models/b", model_name="b", truncate=True),
    ]


def test_one_engine_per_model_and_device_model_after_model() -> None:
    server = Settings(devices=("cpu", "cpu"), workers=2)
    supervisor = Supervisor(server, _models(server))
    try:
        assert [(model.served_model, device) for model, device in supervisor.plan] == [
            ("a", "cpu"),
            ("a", "cpu"),
            ("b", "cpu"),
            ("b", "cpu"),
        ]
        assert len(supervisor.socket_paths) == 4 and supervisor.socket_paths[0].name == "engine.sock"
        supervisor._settings_lines(server)
        engines = [msgspec.json.decode(line, type=Settings) for line in supervisor._engine_lines]
        assert [engine.model for engine in engines] == ["/models/a", "/models/a", "/models/b", "/models/b"]
        assert all(engine.devices == () and engine.models_file == "" for engine in engines)
        assert {engine.cpu_threads for engine in engines} == {max(1, _usable_cores() // 2)}
        assert engines[2].truncate and not engines[0].truncate
        worker = msgspec.json.decode(supervisor._worker_line, type=Settings)
        assert worker.devices == ("cpu", "cpu") and worker.workers == 2
    finally:
        shutil.rmtree(supervisor.folder, ignore_errors=True)


def test_a_worker_splits_the_sockets_into_one_router_per_model(tmp_path: Path) -> None:
    server = Settings(devices=("cpu", "cpu"))
    sockets = [tmp_path / f"engine-{i}.sock" for i in range(4)]
    routers = _routers(_models(server), sockets, Telemetry())
    assert [[link.socket_path for link in router.links] for router in routers] == [sockets[:2], sockets[2:]]
    assert [link.truncate for link in routers[1].links] == [True, True]
    with pytest.raises(ValueError, match="cannot be split"):
        _routers(_models(server), sockets[:3], Telemetry())
