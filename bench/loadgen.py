"""A lean HTTP/1.1 keep-alive load generator, run in its own process so it never shares the
gateway's event loop. Raw asyncio streams (with uvloop when present): far cheaper per request
than an HTTP client library, so on a 2-core machine the client takes little from the server."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    seconds: float
    latencies: list[float]
    statuses: dict[int, int]

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))] if ordered else 0.0


async def _worker(
    host: str, port: int, path: str, bodies: asyncio.Queue[bytes], out: list[tuple[float, int]], *, extra: bytes = b""
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n".encode() + extra
    try:
        while True:
            try:
                body = bodies.get_nowait()
            except asyncio.QueueEmpty:
                return
            started = time.perf_counter()
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            out.append((time.perf_counter() - started, status))
    finally:
        writer.close()


async def _run(url: str, bodies: list[bytes], concurrency: int, extra: bytes = b"") -> LoadResult:
    parts = urlsplit(url)
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    out: list[tuple[float, int]] = []
    started = time.perf_counter()
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/v1/embeddings"
    await asyncio.gather(*[_worker(host, port, path, queue, out, extra=extra) for _ in range(concurrency)])
    seconds = time.perf_counter() - started
    statuses: dict[int, int] = {}
    for _, status in out:
        statuses[status] = statuses.get(status, 0) + 1
    return LoadResult(seconds, [latency for latency, _ in out], statuses)


def _child(url: str, bodies: list[bytes], concurrency: int, conn: mp.connection.Connection, extra: bytes = b"") -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    conn.send(asyncio.run(_run(url, bodies, concurrency, extra)))


def run_load(url: str, bodies: list[bytes], concurrency: int, headers: dict[str, str] | None = None) -> LoadResult:
    """Send every body once over ``concurrency`` keep-alive connections, from a separate process.

    ``headers`` are added to every request (an API key, ``Accept-Encoding``)."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items()).encode()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_child, args=(url, bodies, concurrency, child, extra))
    process.start()
    result: LoadResult = parent.recv()
    process.join()
    return result
