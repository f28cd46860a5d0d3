"""A deterministic RAG-ingest-like corpus from real English prose: the standard library's docstrings.

Shape (by words): 30% short (5-20), 50% medium (40-120), 20% long (200-400). The same seed gives
the same texts on every machine with the same Python minor version.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from pathlib import Path

_MODULES = [
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect",
    "io", "json", "logging", "os", "pathlib", "pickle", "queue", "random", "re", "shutil",
    "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
]  # fmt: skip
_STDLIB = Path(sysconfig.get_paths()["stdlib"])
_SHAPE = [(0.3, 5, 20), (0.5, 40, 120), (0.2, 200, 400)]


def _words() -> list[str]:
    # Docstrings read from the source files with ast, in file order: no imports, so whatever else
    # this process has imported (or monkey-patched) cannot change the corpus.
    seen: set[str] = set()
    words: list[str] = []
    for name in _MODULES:
        base = _STDLIB / name.replace(".", "/")
        source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or doc in seen or len(doc) < 80:
                continue
            seen.add(doc)
            words.extend(re.sub(r"\s+", " ", doc).split(" "))
    return words


def build_corpus(count: int = 2000, seed: int = 1234) -> list[str]:
    words = _words()
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        draw, total, bounds = rng.random(), 0.0, _SHAPE[-1][1:]
        for share, *limits in _SHAPE:
            total += share
            if draw <= total:
                bounds = (limits[0], limits[1])
                break
        length = rng.randint(*bounds)
        start = rng.randrange(0, len(words) - length)
        texts.append(" ".join(words[start : start + length]))
    return texts


def subset(texts: list[str], count: int) -> list[str]:
    """Every k-th text: a smaller corpus with the same length mix (the corpus is already random)."""
    return texts[:: max(1, len(texts) // count)][:count]


if __name__ == "__main__":
    out = Path(__file__).parent / "results" / "corpus.jsonl"
    out.parent.mkdir(exist_ok=True)
    corpus = build_corpus()
    out.write_text("".join(json.dumps({"text": text}) + "\n" for text in corpus))
    print(f"wrote {len(corpus)} texts to {out}")
