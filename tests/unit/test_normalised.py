"""outputs.normalised: TEI's ``normalize: true`` on vectors the model left unnormalised, bit-exact on the rest."""

from __future__ import annotations

import numpy as np

from gateway.core.outputs import normalised


def test_unnormalised_vectors_come_out_at_unit_length_and_unit_ones_unchanged() -> None:
    rng = np.random.default_rng(0)
    raw = [rng.normal(size=384).astype(np.float32) * 7 for _ in range(3)]
    unit = raw[0] / np.linalg.norm(raw[0])
    out = normalised([*raw, unit.astype(np.float32), np.zeros(384, dtype=np.float32)])
    np.testing.assert_allclose(np.linalg.norm(np.stack(out[:3]), axis=1), 1.0, atol=1e-6)
    assert out[3].tobytes() == unit.astype(np.float32).tobytes()
    assert not out[4].any()
