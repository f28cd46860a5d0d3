"""In-process baselines, measured in the same run as the gateway on the same texts."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch


def seed_original(model_dir: Path, texts: list[str], *, device: str = "cpu", batch_size: int = 32) -> float:
    """The seed's ``serve_bge_m3.py`` loop: one CPU thread, every batch padded to 512 tokens.

    Returns seconds. Pooling is the seed's mean pooling; the cost is the same as CLS.
    """
    from transformers import AutoModel, AutoTokenizer

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModel.from_pretrained(str(model_dir)).eval().to(device)
        started = time.perf_counter()
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                padding="max_length",
                truncation=True,
                max_length=512,
                return_tensors="pt",
            ).to(device)
            with torch.no_grad():
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            torch.nn.functional.normalize(vectors, dim=-1).cpu().numpy()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)


def sentence_transformers_encode(model_dir: Path, texts: list[str], *, device: str = "cpu") -> float:
    """``SentenceTransformer.encode(batch_size=32)`` on every core. Returns seconds."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device=device)
    model.encode(texts[:8], batch_size=32)  # warm-up, as the gateway warms up at start
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    assert isinstance(vectors, np.ndarray)
    return time.perf_counter() - started


def redis_mget(url: str, keys: list[str], *, chunk: int, seconds: float) -> float:
    """Raw redis-py (hiredis) MGET of ``chunk`` keys at a time on one connection: keys per second."""
    import redis

    client = redis.Redis.from_url(url)
    groups = [keys[i : i + chunk] for i in range(0, len(keys), chunk)]
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for group in groups:
            client.mget(group)
            done += len(group)
    return done / (time.perf_counter() - started)
