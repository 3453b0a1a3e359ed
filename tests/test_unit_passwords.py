"""Password hashing profiles (HEXA_PASSWORD_HASH): parameters, cross-profile verification,
and the setting's values."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from argon2 import extract_parameters

from hexa.hub.config import PASSWORD_HASH_PROFILES, SettingError, load_settings
from hexa.hub.security import PASSWORD_PROFILES, Passwords


def test_profiles_of_the_setting_are_the_hashers():
    assert set(PASSWORD_HASH_PROFILES) == set(PASSWORD_PROFILES)


@pytest.mark.parametrize(
    ("profile", "expected"), [("strong", (3, 65536, 4)), ("light", (2, 19456, 1))]
)
def test_a_hash_carries_its_profiles_parameters(profile: str, expected: tuple[int, int, int]):
    stored = asyncio.run(Passwords(profile).hash("correct horse battery"))
    params = extract_parameters(stored)
    assert (params.time_cost, params.memory_cost, params.parallelism) == expected
    assert stored.startswith("$argon2id$")


def test_hashes_of_either_profile_verify_under_the_other():
    strong, light = Passwords("strong"), Passwords("light")

    async def check() -> None:
        by_strong = await strong.hash("correct horse battery")
        by_light = await light.hash("correct horse battery")
        assert await light.verify(by_strong, "correct horse battery")
        assert await strong.verify(by_light, "correct horse battery")
        assert not await strong.verify(by_light, "wrong horse battery")
        assert not await light.verify("not a hash", "correct horse battery")
        assert not await light.verify(None, "correct horse battery")  # no such account

    asyncio.run(check())


def test_the_setting_defaults_to_strong_and_refuses_other_names(tmp_path: Path):
    base = {"HEXA_DATA_DIR": str(tmp_path), "HEXA_JWT_SECRET": "x" * 40}
    assert load_settings(environ=base).password_hash == "strong"
    assert load_settings(environ={**base, "HEXA_PASSWORD_HASH": "LIGHT"}).password_hash == "light"
    with pytest.raises(SettingError, match="HEXA_PASSWORD_HASH"):
        load_settings(environ={**base, "HEXA_PASSWORD_HASH": "bcrypt"})
