"""What the Batch API tests share: an ``openai`` client, request lines, and waiting for a batch."""

from __future__ import annotations

import json
import time
from typing import Any

import openai

FINAL = ("completed", "failed", "expired", "cancelled")


def batch_client(url: str) -> openai.OpenAI:
    """The official client against the gateway at ``url`` (no retries: a refusal shows as it is)."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def embedding_line(custom_id: str, text: str | list[str], **body: Any) -> dict[str, Any]:
    """One ``/v1/embeddings`` request line for all-MiniLM-L6-v2; ``body`` adds or replaces fields."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "all-MiniLM-L6-v2", "input": text, **body},
    }


def jsonl(requests: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(one).encode() + b"\n" for one in requests)


def parse_jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def wait_final(client: openai.OpenAI, batch_id: str, timeout_s: float = 60) -> Any:
    """The batch once it is final; fails the test if it is not within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in FINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.05)
