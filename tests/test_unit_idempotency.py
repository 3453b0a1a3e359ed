"""The idempotency store's sealing: encrypted answers bound to their record, keyed hashes."""

from __future__ import annotations

from hexa.api.middleware import ResponseSealer

SECRET = "test-jwt-secret-0123456789abcdef0123456789"


def test_sealed_answer_opens_only_for_its_record() -> None:
    """A sealed answer opens with the same secret and record; another record's associated
    data, another secret or a flipped byte yields nothing."""
    sealer = ResponseSealer(SECRET)
    payload = {"body": "eyJ0b2tlbiI6ICJzM2NyM3QifQ==", "headers": [], "user": None}
    sealed = sealer.seal(payload, b"user:1\0key\0POST\0/x\0201")
    assert "eyJ0b2tlbiI6" not in sealed
    assert sealer.open(sealed, b"user:1\0key\0POST\0/x\0201") == payload
    assert sealer.open(sealed, b"user:2\0key\0POST\0/x\0201") is None
    assert sealer.open(sealed, b"user:1\0key\0POST\0/x\0200") is None
    assert ResponseSealer(SECRET + "-rotated").open(sealed, b"user:1\0key\0POST\0/x\0201") is None
    flipped = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    assert sealer.open(flipped, b"user:1\0key\0POST\0/x\0201") is None


def test_plaintext_left_by_an_older_hub_does_not_open() -> None:
    """A response body stored in plaintext (or empty) is not taken for a sealed answer."""
    sealer = ResponseSealer(SECRET)
    assert sealer.open('{"device_token": "x"}', b"") is None
    assert sealer.open(None, b"") is None
    assert sealer.open("v1:not-base64!", b"") is None


def test_digests_are_keyed_and_unambiguous() -> None:
    """Digests depend on the secret, and on how the parts are split, not only their bytes."""
    sealer = ResponseSealer(SECRET)
    assert sealer.digest(b"key", b"abc") == sealer.digest(b"key", b"abc")
    assert sealer.digest(b"key", b"abc") != ResponseSealer(SECRET + "x").digest(b"key", b"abc")
    assert sealer.digest(b"ab", b"c") != sealer.digest(b"a", b"bc")
    assert len(sealer.digest(b"key", b"abc")) == 64
