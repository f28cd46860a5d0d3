"""int8 on the CPU: export the transformer to ONNX once, quantise it, cache both, gate the quality.

``EMBED_QUANTIZE=int8`` serves the transformer through ONNX Runtime with int8 weights; pooling and
bge-m3's sparse and ColBERT heads still run in torch on the last hidden state it returns
(:class:`OnnxBackend` is an :class:`encoder.backend.Backend`).

* Export: ``torch.onnx.export`` (TorchScript exporter, opset 17, dynamic batch and sequence axes),
  last hidden state out. Models over 2 GB keep their weights in one ``model.onnx.data`` beside it.
* Recipe (:data:`DEFAULT_RECIPE`, ``r2``): ONNX Runtime's transformer fusions, both feed-forward
  MatMuls int8 with a scale per token (:mod:`encoder.int8_rows`), ``quantize_dynamic`` for the rest
  but query/key/value (README "int8 on CPU").
* Long inputs: attention is ``MultiHeadAttention`` behind an ``If`` on "no padding in this batch";
  that branch passes no mask, so ONNX Runtime runs its memory-efficient (flash) CPU kernel, whose
  memory grows with the length, not its square. A padded batch whose score matrix
  (batch x heads x length^2) would pass :data:`MASKED_ATTENTION_BYTES` is split by
  :class:`OnnxBackend` into parts under it (a long input alone, unpadded).
* Cache: ``{cache_dir}/{model content fingerprint}/{fp32-e1|int8-<recipe>-...}/``, each folder with a
  ``manifest.json`` of xxh3 digests. A folder is built in a temporary sibling and renamed into
  place under an ``fcntl.flock`` lock, so two processes starting together build once and never see
  half a file; a folder whose files do not match their digests (or that ONNX Runtime cannot load)
  is rebuilt. A complete folder is read without the lock, so a volume built once
  (:func:`build_int8_cache`, ``embedding-gateway int8 build``) serves pods that mount it read-only.
* Gate: the fixed probe set (:mod:`encoder.int8_probe`) through float32 torch (stored with the
  int8 model) and through int8 at every start, long inputs included; below the floor
  :class:`QualityGateError`.

onnx and onnxruntime are imported only when int8 is asked for (the ``int8`` extra).

The steps live in their own modules; this one re-exports what callers import:

* :mod:`encoder.int8_recipe` - :class:`Recipe` and the recipes measured;
* :mod:`encoder.int8_machine` - CPU flags, the variant this CPU runs, dtype and attention checks;
* :mod:`encoder.onnx_export` - the float32 ONNX export;
* :mod:`encoder.int8_quantize` - fusions, per-row and dynamic quantisation of the exported graph;
* :mod:`encoder.onnx_backend` - :class:`OnnxBackend`, the ONNX Runtime session the encoder uses;
* :mod:`encoder.int8_gate` - the probe set, :func:`measure_gate`, :class:`QualityGateError`;
* :mod:`encoder.int8_cache` - the cache folders, their manifests and the build lock;
* :mod:`encoder.int8_prepare` - :func:`prepare_int8` and :func:`build_int8_cache`.
"""

from __future__ import annotations

from encoder.int8_cache import DEFAULT_CACHE_DIR, Int8CacheError, artifact_ok
from encoder.int8_gate import GateFloor, GateResult, QualityGateError, measure_gate
from encoder.int8_machine import (
    cpu_int8_features,
    expected_speedup,
    for_this_cpu,
    int8_dtype_problem,
    long_input_attention,
    saturates_int8,
)
from encoder.int8_prepare import Int8Model, build_int8_cache, prepare_int8
from encoder.int8_quantize import Shape, fuse_transformer
from encoder.int8_recipe import DEFAULT_RECIPE, PLAIN_RECIPE, R1_RECIPE, Recipe
from encoder.onnx_backend import OnnxBackend

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_RECIPE",
    "PLAIN_RECIPE",
    "R1_RECIPE",
    "GateFloor",
    "GateResult",
    "Int8CacheError",
    "Int8Model",
    "OnnxBackend",
    "QualityGateError",
    "Recipe",
    "Shape",
    "artifact_ok",
    "build_int8_cache",
    "cpu_int8_features",
    "expected_speedup",
    "for_this_cpu",
    "fuse_transformer",
    "int8_dtype_problem",
    "long_input_attention",
    "measure_gate",
    "prepare_int8",
    "saturates_int8",
]
