from __future__ import annotations

import hashlib

import numpy as np
import pytest

from gateway.core.cache import cache_key
from gateway.core.cache.formats import pack_dense, unpack_dense
from gateway.settings import Settings, SettingsError


def test_settings_from_environment_and_overrides() -> None:
    env = {"EMBED_PORT": "9001", "EMBED_TRUNCATE": "true", "EMBED_MODEL_ALIASES": "a, b,", "EMBED_CACHE": "off"}
    settings = Settings.load(env, overrides={"port": "9100", "device": None})
    assert settings.port == 9100
    assert settings.truncate is True
    assert settings.model_aliases == ("a", "b")
    assert settings.cache is False
    assert settings.device == "auto"
    defaults = Settings.load({})
    assert (defaults.model, defaults.served_model, defaults.port, defaults.host) == (
        "BAAI/bge-m3",
        "bge-m3",
        8001,
        "127.0.0.1",
    )
    assert defaults.accepted_models == {"bge-m3", "BAAI/bge-m3"}


@pytest.mark.parametrize(
    ("env", "names"),
    [({"EMBED_PORT": "eighty"}, "EMBED_PORT"), ({"EMBED_MAX_INPUTS": "0"}, "EMBED_MAX_INPUTS")],
)
def test_bad_settings_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError, match=names):
        Settings.load(env)


def test_pack_round_trip_and_rejections() -> None:
    vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    packed = pack_dense(17, vector)
    restored = unpack_dense(packed, 384)
    assert restored is not None
    assert restored[0] == 17
    np.testing.assert_array_equal(restored[1], vector)
    assert unpack_dense(packed, 385) is None
    assert unpack_dense(packed[:-1], 384) is None
    assert unpack_dense(None, 384) is None
    assert unpack_dense(b"E2" + packed[2:], 384) is None
    flipped = bytearray(packed)
    flipped[100] ^= 0x10
    assert unpack_dense(bytes(flipped), 384) is None


def test_keys_hash_the_text_and_name_the_model() -> None:
    key = cache_key("emb", "abcd1234", "hello")
    prefix, namespace, digest = key.split(":")
    assert (prefix, namespace) == ("emb", "abcd1234")
    assert digest == hashlib.blake2s(b"hello").hexdigest(), "a collision-resistant digest"
    assert cache_key("emb", "abcd1234", "hello ") != key
    assert "hello" not in key
    assert cache_key("emb", "x", "\ud800 lone surrogate")  # must not raise
