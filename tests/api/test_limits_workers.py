"""Issue 26: ``EMBED_WORKERS > 1`` without Redis would give every worker process its own buckets (each
key's limits times the workers), so ``serve`` refuses it at start with one line, exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_workers_without_redis_and_a_limited_key_exit_2_with_one_line(tmp_path: Path, minilm_dir: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nname = "a"\nkey = "sk-a"\nrequests_per_minute = 60\n')
    env = {key: value for key, value in os.environ.items() if not key.startswith("EMBED_")}
    env.update(EMBED_WORKERS="2", EMBED_API_KEYS_FILE=str(keys), EMBED_MODEL=str(minilm_dir))
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if "invalid setting" in line]
    assert len(lines) == 1, done.stderr
    assert "EMBED_WORKERS" in lines[0] and "EMBED_REDIS_URL" in lines[0], lines[0]
    assert "Traceback" not in done.stderr
