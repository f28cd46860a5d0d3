"""Settings that cannot work stop the server before the model loads: exit 2, one line naming the
variable and the flag (README's promise)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import cli


def _serve(capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, list[str]]:
    code = cli.main(["serve", *flags])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


@pytest.mark.parametrize(
    ("flags", "variable", "flag", "says"),
    [
        (["--device", "tpu"], "EMBED_DEVICE", "--device", "auto, cpu, cuda, cuda:N or mps"),
        (["--device", "cuda:7"], "EMBED_DEVICE", "--device", "not available"),
        (["--dtype", "int4"], "EMBED_DTYPE", "--dtype", "float32, float16 or bfloat16"),
        (["--max-input-tokens", "9000"], "EMBED_MAX_INPUT_TOKENS", "--max-input-tokens", "limit of 256"),
        (["--redis-url", "http://user:pw@cache:6379"], "EMBED_REDIS_URL", "--redis-url", "redis://"),
        (["--port", "eighty"], "EMBED_PORT", "--port", "int"),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], minilm_dir: Path, flags: list[str], variable: str, flag: str, says: str
) -> None:
    code, lines = _serve(capsys, "--model", str(minilm_dir), *flags)
    assert code == 2
    assert len(lines) == 1, lines
    assert f"{variable} ({flag})" in lines[0]
    assert says in lines[0]
    assert "pw" not in lines[0], "credentials are never printed"


def test_a_missing_model_folder_exits_2_before_loading(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, lines = _serve(capsys, "--model", str(tmp_path / "nothing-here"))
    assert code == 2
    assert len(lines) == 1
    assert "EMBED_MODEL (--model)" in lines[0]


def test_check_masks_the_redis_password(capsys: pytest.CaptureFixture[str], minilm_dir: Path) -> None:
    code = cli.main(["check", "--model", str(minilm_dir), "--redis-url", "redis://app:s3cret@127.0.0.1:1/0"])
    out = capsys.readouterr().out
    assert code == 1  # nothing listens on port 1
    assert "s3cret" not in out
    assert "redis://app:***@127.0.0.1:1/0" in out


@pytest.mark.parametrize("content", ["", " , \n\n"])
def test_an_auth_setting_without_a_key_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str
) -> None:
    """Issue 26 item 7: ``--api-keys @empty`` would otherwise serve with no auth at all. The model
    folder does not exist, so a missing key check shows as the model's line, not as a server that
    starts (the subprocess test below runs the real folder)."""
    keys = tmp_path / "keys.txt"
    keys.write_text(content)
    for value in (f"@{keys}", " , "):
        code, lines = _serve(capsys, "--model", str(tmp_path / "no-model"), "--api-keys", value)
        assert code == 2
        assert len(lines) == 1, lines
        assert "EMBED_API_KEYS (--api-keys)" in lines[0] and "no key" in lines[0], lines[0]


def test_serve_with_an_empty_key_file_exits_2_without_a_traceback(minilm_dir: Path, tmp_path: Path) -> None:
    """The console script with the variable set, as an operator runs it (the model is real: without
    the check this would load it and serve, open to anyone, until the timeout)."""
    import os
    import subprocess
    import sys

    keys = tmp_path / "keys.txt"
    keys.write_text("\n")
    env = {**os.environ, "EMBED_API_KEYS": f"@{keys}", "EMBED_MODEL": str(minilm_dir), "EMBED_PORT": "0"}
    env["HF_HUB_OFFLINE"] = "1"
    console = Path(sys.executable).parent / "embedding-gateway"  # the installed console script
    argv = [str(console), "serve"] if console.exists() else [sys.executable, "-m", "gateway", "serve"]
    done = subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=30)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, lines
    assert "EMBED_API_KEYS (--api-keys)" in lines[0] and str(keys) in lines[0]


def test_a_misspelt_setting_is_named_with_the_one_it_meant() -> None:
    from gateway.settings import Settings, SettingsError

    environ = {"EMBED_MAX_CONECTIONS": "5", "EMBED_PORT": "9000", "EMBED_ZZZ": "1", "OTHER": "x"}
    lines = Settings.unknown_variables(environ)
    assert lines == [
        "EMBED_MAX_CONECTIONS is not a setting (did you mean EMBED_MAX_CONNECTIONS?); it is ignored",
        "EMBED_ZZZ is not a setting; it is ignored",
    ]
    assert Settings.load(environ).port == 9000  # a warning by default
    with pytest.raises(SettingsError, match="EMBED_MAX_CONECTIONS is not a setting .*EMBED_MAX_CONNECTIONS"):
        Settings.load({**environ, "EMBED_STRICT_SETTINGS": "true"})


def test_check_warns_of_a_misspelt_setting_and_strict_mode_exits_2(minilm_dir) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    env = {**os.environ, "EMBED_MODEL": str(minilm_dir), "EMBED_MAX_CONECTIONS": "5", "HF_HUB_OFFLINE": "1"}
    warned = subprocess.run(
        [sys.executable, "-m", "gateway", "check"], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert "EMBED_MAX_CONECTIONS is not a setting (did you mean EMBED_MAX_CONNECTIONS?)" in warned.stderr
    strict = subprocess.run(
        [sys.executable, "-m", "gateway", "check"],
        check=False,
        env={**env, "EMBED_STRICT_SETTINGS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert strict.returncode == 2
    assert strict.stderr.count("\n") == 1 and "Traceback" not in strict.stderr
