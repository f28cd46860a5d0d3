"""The on-disk cache of int8 builds: folders checked by digest, built aside, renamed into place.

Exporting and quantising take minutes, so each is done once per model and kept under
``{cache_dir}/{model content fingerprint}/`` (:data:`DEFAULT_CACHE_DIR` unless set): an
``fp32-...`` folder with the export, an ``int8-...`` folder per recipe with the int8 model and the
float32 reference vectors of the gate. Every folder has a ``manifest.json`` of xxh3 digests
(:func:`artifact_ok` checks a folder against it). A folder is built in a temporary sibling and
renamed into place (:func:`_publish`) under an ``fcntl.flock`` lock (:func:`_locked`), so two
processes starting together build once and never see half a file; a complete folder is read
without the lock, so a volume built once serves pods that mount it read-only. A folder that does
not match its digests, or that ONNX Runtime cannot load, is rebuilt (:func:`_load_checked`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xxhash

from encoder.onnx_backend import OnnxBackend
from encoder.onnx_export import _MODEL_FILE

__all__ = ["DEFAULT_CACHE_DIR", "Int8CacheError", "artifact_ok"]

logger = logging.getLogger("encoder.onnx_int8")  # int8's one logger, whichever step logs

DEFAULT_CACHE_DIR = Path("~/.cache/embedding-gateway/onnx")
_REFERENCE_FILE = "reference.npy"
_LONG_REFERENCE_FILE = "reference-long.npy"
_MANIFEST = "manifest.json"


class Int8CacheError(RuntimeError):
    """The int8 cache cannot give this process a model: not writable and no valid prebuilt folder."""


def _digest(path: Path) -> str:
    digest = xxhash.xxh3_64()
    with path.open("rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(folder: Path, info: dict[str, Any]) -> None:
    files = {p.name: _digest(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != _MANIFEST}
    (folder / _MANIFEST).write_text(json.dumps({**info, "files": files}, indent=2, sort_keys=True))


def artifact_ok(folder: Path) -> bool:
    """Does ``folder`` hold every file its manifest lists, byte for byte?"""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        files: dict[str, str] = manifest["files"]
        return _MODEL_FILE in files and all(_digest(folder / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _publish(root: Path, name: str, build: Any) -> Path:
    """Build ``root/name`` with ``build(tmp_folder)`` into a temporary sibling, then rename it in.

    Called with the lock held, so any ``.tmp-*`` sibling is a leftover of a crashed builder.
    """
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published folder is as readable as a file
    try:
        build(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _load_checked(folder: Path, threads: int, *, quiet: bool = False) -> OnnxBackend | None:
    if not artifact_ok(folder):
        if folder.exists() and not quiet:
            logger.warning("int8 cache %s is incomplete or corrupt: rebuilding it", folder)
        return None
    try:
        heads = int(json.loads((folder / _MANIFEST).read_text()).get("heads", 0))
        return OnnxBackend(folder / _MODEL_FILE, threads, heads=heads)
    except Exception as exc:  # ONNX Runtime raises its own types for a file it cannot load
        if not quiet:
            logger.warning("int8 cache %s does not load (%s): rebuilding it", folder, exc)
        return None


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    """Hold ``root/.lock`` (only builders take it); a cache that cannot be written is one clear error."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = (root / ".lock").open("a+")
    except OSError as exc:
        raise Int8CacheError(
            f"the int8 cache {root} cannot be written ({exc.strerror or exc}) and holds no complete, valid {name} "
            "(missing, incomplete or corrupt): build it onto that volume once with `embedding-gateway int8 build` "
            "(same EMBED_MODEL, EMBED_REVISION and EMBED_ONNX_CACHE_DIR; README, int8 on CPU)"
        ) from exc
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
