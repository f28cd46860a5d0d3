"""The histograms /metrics exports (issue 27 #6, #7): summed over processes, with buckets wide enough.

* ``Telemetry.combined`` (EMBED_WORKERS > 1) sums every process's histogram buckets, so the
  request-duration, batch-size, batch-tokens and encoder-seconds histograms have observations;
* a 60 s request or forward pass lands in a finite bucket (requests may run to 300 s, an
  8,192-token pass on CPU for well over 10 s).
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from encoder.batcher import BatchReport
from gateway.core.telemetry import LiveState, Telemetry

HISTOGRAMS = (
    "embedding_request_duration_seconds",
    "embedding_batch_size",
    "embedding_batch_tokens",
    "embedding_encoder_seconds",
)


def _samples(telemetry: Telemetry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = telemetry.render_prometheus(LiveState()).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _fed(requests: list[float], batches: list[tuple[int, int, float]]) -> Telemetry:
    telemetry = Telemetry()
    for seconds in requests:
        telemetry.request_done("/v1/embeddings", 200, seconds, embedding=True)
    for size, tokens, seconds in batches:
        telemetry.batch_done(BatchReport(size=size, tokens=tokens, padded_tokens=tokens, seconds=seconds))
    return telemetry


def _histogram(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> dict[str, float]:
    """``le`` -> cumulative count, plus ``count`` and ``sum`` (any labels but ``le`` summed over)."""
    found: dict[str, float] = {}
    for (sample, labels), value in samples.items():
        label_map = dict(labels)
        if sample == f"{name}_bucket":
            found[label_map["le"]] = found.get(label_map["le"], 0.0) + value
        elif sample in (f"{name}_count", f"{name}_sum"):
            key = sample.rpartition("_")[2]
            found[key] = found.get(key, 0.0) + value
    return found


def test_combined_sums_every_process_histograms() -> None:
    worker_a = _fed([0.004, 0.2], [])
    worker_b = _fed([1.5], [])
    engine = _fed([], [(3, 90, 0.02), (8, 512, 0.3)])
    combined = Telemetry.combined([engine.state(), worker_a.state(), worker_b.state()])
    samples = _samples(combined)
    duration = _histogram(samples, "embedding_request_duration_seconds")
    assert duration["count"] == 3 and duration["sum"] == pytest.approx(1.704)
    assert duration["0.005"] == 1 and duration["0.25"] == 2 and duration["2.5"] == 3 and duration["+Inf"] == 3
    size = _histogram(samples, "embedding_batch_size")
    assert size["count"] == 2 and size["sum"] == 11 and size["4.0"] == 1 and size["8.0"] == 2
    tokens = _histogram(samples, "embedding_batch_tokens")
    assert tokens["count"] == 2 and tokens["128.0"] == 1 and tokens["512.0"] == 2
    seconds = _histogram(samples, "embedding_encoder_seconds")
    assert seconds["count"] == 2 and seconds["0.025"] == 1 and seconds["0.5"] == 2
    # the same text a single process renders for the same observations
    alone = _fed([0.004, 0.2, 1.5], [(3, 90, 0.02), (8, 512, 0.3)])
    for name in HISTOGRAMS:
        assert _histogram(_samples(alone), name) == pytest.approx(_histogram(samples, name))


def test_a_60_second_request_and_forward_pass_land_in_a_finite_bucket() -> None:
    samples = _samples(_fed([60.0], [(1, 8192, 60.0)]))
    for name in ("embedding_request_duration_seconds", "embedding_encoder_seconds"):
        buckets = _histogram(samples, name)
        finite = {le: count for le, count in buckets.items() if le not in ("+Inf", "count", "sum")}
        assert max(finite.values()) == 1, f"{name}: a 60 s observation is only in +Inf ({buckets})"
    request_bounds = {float(le) for (name, labels), _ in samples.items() for key, le in labels if key == "le"}
    assert 300.0 in request_bounds  # requests may run to 300 s


def test_histograms_survive_the_trip_through_a_state() -> None:
    """A worker's state crosses to the engine as msgpack: its buckets come back whole."""
    import msgspec

    from gateway.core.telemetry import TelemetryState

    fed = _fed([0.01, 45.0], [(2, 64, 11.0)])
    state = msgspec.msgpack.decode(msgspec.msgpack.encode(fed.state()), type=TelemetryState)
    again = _samples(Telemetry.combined([state]))
    for name in HISTOGRAMS:
        assert _histogram(again, name) == pytest.approx(_histogram(_samples(fed), name))
