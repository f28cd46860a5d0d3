"""Pieces the benchmark scripts share: a gateway subprocess, a private Redis, request bodies, tables."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from support.processes import RedisServer, free_port, wait_for_port


@contextmanager
def private_redis() -> Iterator[RedisServer]:
    folder = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


SERVER_PIDS: dict[str, int] = {}  # base URL -> pid of the gateway process serving it (while it runs)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far, from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def gateway(env: Mapping[str, str], log: Path, cwd: Path | None = None) -> Iterator[str]:
    """``python -m gateway serve`` with ``env`` (run in ``cwd``: another checkout); yields its base URL."""
    port = free_port()
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "EMBED_LOG_LEVEL": "warning", **env, "EMBED_PORT": str(port)}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"], env=full_env, stdout=out, stderr=out, cwd=cwd
        )
        try:
            deadline = time.monotonic() + 900
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"gateway exited: {log.read_text()[-2000:]}")
                try:
                    wait_for_port(port, timeout=1)
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                        break
                except (TimeoutError, httpx.HTTPError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("gateway did not start")
            SERVER_PIDS[f"http://127.0.0.1:{port}"] = process.pid
            yield f"http://127.0.0.1:{port}"
        finally:
            SERVER_PIDS.pop(f"http://127.0.0.1:{port}", None)
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def bodies(texts: list[str], per_request: int, model: str | None = None, fmt: str = "base64") -> list[bytes]:
    out = []
    for start in range(0, len(texts), per_request):
        body: dict[str, Any] = {"input": texts[start : start + per_request], "encoding_format": fmt}
        if model:
            body["model"] = model
        out.append(json.dumps(body).encode())
    return out


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        return f"{value:,.2f}" if isinstance(value, float) else str(value)

    widths = [max(len(col), *(len(cell(row.get(col, ""))) for row in rows)) for col in columns]
    lines = [" | ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(cell(row.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True)) for row in rows]
    return "\n".join(lines)
