"""Two gateways on one Redis (or one cluster) share the cache: a text computed by one is a hit on the other."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from encoder import Encoder
from support.processes import RedisCluster
from tests.helpers import embed, fetch_stats, vectors
from tests.servers import RedisServer

pytestmark = pytest.mark.slow

TEXTS = [f"replica text {i}, computed once for every gateway" for i in range(20)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    nodes = RedisCluster(tmp_path_factory.mktemp("replica-cluster"))
    nodes.start()
    yield nodes
    nodes.stop()


@pytest.mark.parametrize("mode", ["single", "cluster"])
def test_a_text_computed_by_one_gateway_is_a_hit_on_the_other(
    gateway_factory, redis_server: RedisServer, cluster: RedisCluster, minilm_encoder: Encoder, mode: str
) -> None:  # type: ignore[no-untyped-def]
    url = redis_server.url if mode == "single" else cluster.url
    shared = {"redis_url": url, "redis_mode": mode, "cache_prefix": f"replicas-{mode}-{time.monotonic_ns()}"}
    first, second = gateway_factory(**shared), gateway_factory(**shared)

    computed = embed(first.url, TEXTS)
    service = first.server.config.app.state.runtime.service
    deadline = time.monotonic() + 5
    while service.pending_writes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fetch_stats(first.url)["cache"]["writes"] == len(TEXTS)

    served = embed(second.url, TEXTS)
    stats = fetch_stats(second.url)
    assert stats["cache"]["hits"] == len(TEXTS) and stats["cache"]["misses"] == 0
    assert stats["encoder"]["batches"] == 0, "the second gateway must not run the model"
    np.testing.assert_array_equal(vectors(computed), vectors(served))
    np.testing.assert_allclose(vectors(served), minilm_encoder.embed(TEXTS), atol=1e-6)
    assert served.json()["usage"] == computed.json()["usage"]
