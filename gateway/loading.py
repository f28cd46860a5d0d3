"""Load the configured model and warm it up: the one loader of the server and the engine process.

With ``EMBED_WORKERS = 1`` the app's lifespan loads the model in the HTTP process
(:mod:`gateway.http.app`); with more, the engine process loads it and the HTTP workers load only its
tokenizer (:mod:`gateway.engine.server`). Both call :func:`load_model`, so it lives outside both
layers: it needs the encoder and the settings, and nothing of HTTP, so the engine can load a model
without importing Litestar (tests/unit/test_layout.py checks that the engine never imports it).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from encoder import Encoder, load_encoder
from encoder.kinds import OutputKind
from encoder.onnx_int8 import GateFloor
from gateway.core.storage_gate import StorageGateError, check_storage
from gateway.settings import Settings

__all__ = ["load_model"]

# The name the loader logged under in gateway.http.app: log lines read as before.
logger = logging.getLogger("gateway")


def load_model(settings: Settings) -> Encoder:
    """Load and warm up the configured model (seconds to minutes: call it before serving).

    The torch work runs on a thread of its own that has ended when this returns. libgomp (torch's
    CPU OpenMP) gives every thread that runs a parallel region its own team of worker threads for
    the thread's life, and once a process holds more team threads than cores every barrier sleeps
    in the kernel instead of spinning: loading on the main thread (or asyncio's default executor,
    whose threads live on) left a second team beside the micro-batcher's forward thread, and the
    server ran misses at 0.75x the encoder's in-process speed (issue 11; README, Performance).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder-load") as loader:
        return loader.submit(_load_and_warm_up, settings).result()


def _load_and_warm_up(settings: Settings) -> Encoder:
    encoder = load_encoder(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        cpu_threads=settings.cpu_threads or None,
        max_tokens=settings.max_input_tokens or None,
        truncate=settings.truncate,
        revision=settings.revision or None,
        quantize=settings.quantize,
        onnx_cache_dir=settings.onnx_cache_dir or None,
        int8_floor=GateFloor(
            min_cosine=settings.int8_min_cosine,
            mean_cosine=settings.int8_min_mean_cosine,
            top10_overlap=settings.int8_min_top10_overlap,
        ),
    )
    encoder.warmup()
    if settings.cache_dtype != "float32" and encoder.outputs - {OutputKind.SCORE}:  # scores stay float32
        gate = check_storage(encoder, settings.cache_dtype, settings.cache_dtype_min_cosine or None)
        if not gate.passed:
            raise StorageGateError(settings.served_model, gate)
        logger.info("storage gate passed: %s", gate.describe())
    logger.info(
        "loaded: model=%s served_as=%s device=%s dtype=%s weights=%.1f MiB%s",
        settings.model,
        settings.served_model,
        encoder.device,
        encoder.dtype,
        _weight_bytes(encoder) / 2**20,
        _device_memory(encoder),
    )
    return encoder


def _weight_bytes(encoder: Encoder) -> int:
    """The model's parameters and buffers in memory (0 for a backend without a torch model: int8 ONNX)."""
    if encoder.model is None:
        return 0
    tensors = [*encoder.model.parameters(), *encoder.model.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _device_memory(encoder: Encoder) -> str:
    """On a GPU, what the process holds there after this model's warm-up (all models loaded so far)."""
    import torch

    device = encoder.torch_device
    if device.type != "cuda":
        return ""
    return f" gpu_allocated={torch.cuda.memory_allocated(device) / 2**20:.1f} MiB"
