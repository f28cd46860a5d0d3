"""A batcher worker that crashes is a clear 500 for the requests it held, then served again."""

from __future__ import annotations

import httpx

from encoder.batcher import BatchReport
from gateway.core.telemetry import Telemetry


class _BrokenOnce(Telemetry):
    """Telemetry whose first ``batch_done`` raises: a failure in the worker outside the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = True

    def batch_done(self, report: BatchReport) -> None:
        super().batch_done(report)
        if self.armed:
            self.armed = False
            raise RuntimeError("injected failure after a batch")


def test_a_worker_crash_is_a_500_with_the_request_id_and_the_worker_restarts(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(telemetry=_BrokenOnce())
    crashed = httpx.post(
        f"{live.url}/v1/embeddings",
        json={"input": ["lost to the crash"]},
        headers={"x-request-id": "req-crash-1"},
        timeout=10,
    )
    assert crashed.status_code == 500
    error = crashed.json()["error"]
    assert error["type"] == "server_error"
    assert error["code"] == "encoder_error"
    assert "req-crash-1" in error["message"]
    assert "Traceback" not in crashed.text

    served = httpx.post(f"{live.url}/v1/embeddings", json={"input": ["served after the restart"]}, timeout=10)
    assert served.status_code == 200
    assert httpx.get(f"{live.url}/stats").json()["encoder"]["worker_restarts"] == 1
    assert "embedding_batcher_worker_restarts_total 1.0" in httpx.get(f"{live.url}/metrics").text
    assert httpx.get(f"{live.url}/readyz").status_code == 200
