"""A hub model's revision is resolved to a commit once, before the engine first loads (issue 26): every
engine restart then loads that commit, whatever the hub's branch names by then."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from encoder.model_files import pinned_revision, resolve_model_dir
from gateway.cli import pin_model_revision
from gateway.settings import Settings

FIRST, SECOND = hashlib.sha1(b"first").hexdigest(), hashlib.sha1(b"second").hexdigest()


@pytest.fixture
def hub_cache(tmp_path: Path, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hub cache as huggingface_hub lays it out, holding two commits of gw-test/minilm; "main" names the first."""
    import huggingface_hub.constants

    repo = tmp_path / "models--gw-test--minilm"
    for commit in (FIRST, SECOND):
        (repo / "snapshots" / commit).mkdir(parents=True)
        for name in ("config.json", "modules.json"):
            shutil.copyfile(minilm_dir / name, repo / "snapshots" / commit / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FIRST)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return repo


def test_the_supervisor_s_settings_name_the_commit_the_branch_named_at_start(hub_cache: Path) -> None:
    pinned = pin_model_revision(Settings(model="gw-test/minilm"))
    assert pinned.revision == FIRST
    (hub_cache / "refs" / "main").write_text(SECOND)  # the branch moves on
    assert resolve_model_dir(pinned.model, pinned.revision) == hub_cache / "snapshots" / FIRST
    assert resolve_model_dir("gw-test/minilm") == hub_cache / "snapshots" / SECOND


def test_a_branch_or_tag_given_is_pinned_too_and_a_local_folder_is_left_alone(
    hub_cache: Path, minilm_dir: Path
) -> None:
    assert pinned_revision("gw-test/minilm", "main") == FIRST
    assert pinned_revision("gw-test/minilm", SECOND) == SECOND
    assert pinned_revision(str(minilm_dir)) is None
    local = Settings(model=str(minilm_dir))
    assert pin_model_revision(local) is local
    missing = Settings(model="gw-test/not-in-the-cache")
    assert pin_model_revision(missing) is missing  # preflight reports it, with its own message
