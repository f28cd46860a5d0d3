"""int8 in a real deployment (issue 27, item 5): built once onto a volume, read by every pod read-only.

A prebuilt cache on a read-only mount used to fail at start: the lock file was always opened for
writing. Now a complete, valid folder loads without a lock; a missing one is a one-line error that
names the build command. Tests run as root, which ignores file modes, so read-only here means what
refuses root too: a read-only bind mount in a private mount namespace (``unshare -m``), or else
``chattr +i``; without either the tests skip and say why.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from encoder.model_files import read_model_spec
from encoder.onnx_int8 import DEFAULT_RECIPE, GateFloor, artifact_ok, for_this_cpu, prepare_int8

ROOT = Path(__file__).resolve().parents[2]
NO_FLOOR = GateFloor(min_cosine=-1.0, mean_cosine=-1.0, top10_overlap=0.0)

_LOAD_CHILD = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from transformers import AutoTokenizer
from encoder.model_files import read_model_spec
from encoder.onnx_int8 import GateFloor, prepare_int8

spec = read_model_spec(Path({model!r}))
try:
    prepared = prepare_int8(spec, AutoTokenizer.from_pretrained({model!r}), cache_dir={cache!r}, threads=1,
                            floor=GateFloor(-1.0, -1.0, 0.0))
except Exception as exc:
    print(f"{{type(exc).__name__}}: {{exc}}")
    raise SystemExit(3 if type(exc).__name__ == "Int8CacheError" else 4)
print("built" if prepared.built else "reused", prepared.folder.name)
"""


def _unshare_works(folder: Path) -> bool:
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && ! touch "$1/.probe" 2>/dev/null'
    try:
        probe = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(folder)],
            check=False,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _chattr(flag: str, folder: Path) -> bool:
    try:
        return (
            subprocess.run(["chattr", "-R", flag, str(folder)], check=False, capture_output=True, timeout=30).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def _refuses_writes(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.touch()
    except OSError:
        return True
    probe.unlink()
    return False


@contextmanager
def read_only(folder: Path) -> Iterator[list[str]]:
    """A command prefix that runs a command with ``folder`` refusing writes, even from root."""
    if _unshare_works(folder):
        script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
        yield ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(folder)]
        return
    if _chattr("+i", folder):
        try:
            if _refuses_writes(folder):
                yield []
                return
        finally:
            _chattr("-i", folder)
    pytest.skip("cannot make a folder read-only for root here: unshare -m (CAP_SYS_ADMIN) and chattr +i both failed")


def _load_read_only(model: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    code = _LOAD_CHILD.format(root=str(ROOT), model=str(model), cache=str(cache))
    with read_only(cache) as prefix:
        return subprocess.run(
            [*prefix, sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=600
        )


@pytest.fixture(scope="module")
def built_cache(tiny_bge_m3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("onnx-prebuilt")
    spec = read_model_spec(tiny_bge_m3_dir)
    prepare_int8(spec, AutoTokenizer.from_pretrained(str(tiny_bge_m3_dir)), cache_dir=cache, threads=1, floor=NO_FLOOR)
    return cache


def test_a_valid_prebuilt_cache_on_a_read_only_mount_loads_without_a_lock(
    tiny_bge_m3_dir: Path, built_cache: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "volume"
    shutil.copytree(built_cache, cache)
    for lock in cache.glob("*/.lock"):
        lock.unlink()  # a volume filled by a Job: no lock file was ever left there for the pods
    done = _load_read_only(tiny_bge_m3_dir, cache)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split()[-2] == "reused", done.stdout
    assert not list(cache.glob("*/.lock")), "a reader never creates the lock"


def test_a_read_only_cache_without_the_model_says_how_to_build_it(
    tiny_bge_m3_dir: Path, built_cache: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _load_read_only(tiny_bge_m3_dir, empty)
    assert done.returncode == 3, done.stdout + done.stderr
    line = done.stdout.strip()
    assert "\n" not in line and "embedding-gateway int8 build" in line and str(empty) in line
    # a corrupt file in a read-only folder is the same error, never a traceback or a half-built folder
    corrupt = tmp_path / "corrupt"
    shutil.copytree(built_cache, corrupt)
    (model_file,) = corrupt.glob("*/int8-*/model.onnx")
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    done = _load_read_only(tiny_bge_m3_dir, corrupt)
    assert done.returncode == 3 and "incomplete or corrupt" in done.stdout, done.stdout + done.stderr


def test_int8_cache_error_is_raised_in_process_too(tiny_bge_m3_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    from encoder.onnx_int8 import Int8CacheError

    spec = read_model_spec(tiny_bge_m3_dir)
    with pytest.raises(Int8CacheError, match="embedding-gateway int8 build"):
        prepare_int8(spec, AutoTokenizer.from_pretrained(str(tiny_bge_m3_dir)), cache_dir=blocker, threads=1)


def test_the_build_command_fills_a_volume_that_pods_then_read_read_only(
    tiny_bge_m3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from encoder.onnx_int8 import build_int8_cache

    volume = tmp_path / "onnx"
    # threads=None: every core, as torch has them already (a number would stay set for later tests)
    code = build_int8_cache(str(tiny_bge_m3_dir), cache_dir=volume, floor=NO_FLOOR, all_variants=True)
    out = capsys.readouterr().out
    assert code == 0, out
    names = sorted(p.name for p in volume.glob("*/int8-*"))
    eight, seven = DEFAULT_RECIPE.name, f"{DEFAULT_RECIPE.name}-7bit"
    assert sorted(re.sub(r"-e\d.*", "", name) for name in names) == [f"int8-{eight}", f"int8-{seven}"], names
    assert all(artifact_ok(folder) for folder in volume.glob("*/int8-*"))
    assert for_this_cpu(DEFAULT_RECIPE).name in out and str(volume) in out
    manifest = json.loads(next(volume.glob("*/int8-*/manifest.json")).read_text())
    assert manifest["heads"] == 4
    done = _load_read_only(tiny_bge_m3_dir, volume)
    assert done.returncode == 0 and done.stdout.split()[-2] == "reused", done.stdout + done.stderr


def test_the_build_command_exits_2_when_the_gate_fails(tiny_bge_m3_dir: Path, tmp_path: Path) -> None:
    from encoder.onnx_int8 import build_int8_cache

    impossible = GateFloor(min_cosine=1.01, mean_cosine=1.01, top10_overlap=1.01)
    assert build_int8_cache(str(tiny_bge_m3_dir), cache_dir=tmp_path, floor=impossible) == 2


def test_the_image_installs_the_int8_extra() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    extras = re.search(r"^ARG EXTRAS=(\S*)", dockerfile, re.MULTILINE)
    assert extras is not None and "int8" in extras.group(1).split(","), "the image must install onnxruntime and onnx"
    assert 'pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"' in dockerfile, "the package is installed with them"
    assert re.search(r"^ENV .*EMBED_ONNX_CACHE_DIR=/onnx", dockerfile, re.MULTILINE), "the cache is not under $HOME"


def test_the_int8_build_command_is_on_the_cli(tiny_bge_m3_dir: Path, tmp_path: Path) -> None:
    from gateway import cli

    args = ["int8", "build", "--model", str(tiny_bge_m3_dir), "--onnx-cache-dir", str(tmp_path)]
    floors = ["--int8-min-cosine", "-1", "--int8-min-mean-cosine", "-1", "--int8-min-top10-overlap", "0"]
    assert cli.main([*args, *floors]) == 0
    assert len(list(tmp_path.glob("*/int8-*/model.onnx"))) == 1
