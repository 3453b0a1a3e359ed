"""The login throttle's arithmetic (no I/O): per-pair, per-address and per-account backoff
with an injected clock, the owner never locked out from a clean address, bounded memory."""

from __future__ import annotations

import pytest

from hexa.hub.errors import RateLimited
from hexa.hub.throttle import LoginThrottle

F, W = 5, 900


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(**kw: int) -> tuple[LoginThrottle, Clock]:
    clock = Clock()
    return LoginThrottle(F, W, base_s=10, clock=clock, **kw), clock


def fail(t: LoginThrottle, email: str, address: str | None, n: int = 1) -> None:
    for _ in range(n):
        with t.attempt(email, address) as attempt:
            attempt.failed()


def allowed(t: LoginThrottle, email: str, address: str | None) -> bool:
    return t.retry_after_s(email, address) == 0


def test_pair_backs_off_exponentially_after_free_failures() -> None:
    """After 5 failures the pair waits 10 s, then 20 s, 40 s ... never more than the window."""
    t, clock = make()
    fail(t, "a@x.test", "10.0.0.1", F)
    assert t.retry_after_s("a@x.test", "10.0.0.1") == 10
    with pytest.raises(RateLimited) as err:
        t.check("a@x.test", "10.0.0.1")
    assert err.value.retry_after_s == 10
    clock.t += 10
    assert allowed(t, "a@x.test", "10.0.0.1")
    fail(t, "a@x.test", "10.0.0.1")
    assert t.retry_after_s("a@x.test", "10.0.0.1") == 20
    for _ in range(20):
        clock.t += t.retry_after_s("a@x.test", "10.0.0.1")
        fail(t, "a@x.test", "10.0.0.1")
    assert t.retry_after_s("a@x.test", "10.0.0.1") == W


def test_other_address_is_not_slowed_by_a_pair() -> None:
    """Failures from address A for an account leave that account's login from B untouched."""
    t, clock = make()
    for _ in range(12):
        clock.t += t.retry_after_s("a@x.test", "10.0.0.1")
        fail(t, "a@x.test", "10.0.0.1")
    assert not allowed(t, "a@x.test", "10.0.0.1")
    assert allowed(t, "a@x.test", "10.0.0.2")
    assert allowed(t, "a@x.test", None)


def test_success_resets_the_pair() -> None:
    """A successful login clears the pair: 4 failures, success, 4 failures, still allowed."""
    t, _ = make()
    fail(t, "a@x.test", "10.0.0.1", F - 1)
    with t.attempt("a@x.test", "10.0.0.1") as attempt:
        attempt.succeeded()
    fail(t, "a@x.test", "10.0.0.1", F - 1)
    assert allowed(t, "a@x.test", "10.0.0.1")


def test_counters_are_forgotten_after_the_window() -> None:
    """A counter is forgotten two windows after its last failure, not before."""
    t, clock = make()
    fail(t, "a@x.test", "10.0.0.1", F)
    clock.t += 2 * W - 1
    fail(t, "a@x.test", "10.0.0.1")
    assert t.retry_after_s("a@x.test", "10.0.0.1") == 20
    clock.t += 2 * W
    assert allowed(t, "a@x.test", "10.0.0.1")
    fail(t, "a@x.test", "10.0.0.1", F - 1)
    assert allowed(t, "a@x.test", "10.0.0.1")


def test_hammering_one_account_does_not_slow_others_from_that_address() -> None:
    """However many failures one account gets from an address, other accounts there pass."""
    t, clock = make()
    for _ in range(40):
        clock.t += t.retry_after_s("x@x.test", "10.0.0.1")
        fail(t, "x@x.test", "10.0.0.1")
    assert allowed(t, "y@x.test", "10.0.0.1")


def test_spraying_from_one_address_backs_off_the_address() -> None:
    """20 failures across accounts from one address: every account from there waits."""
    t, clock = make()
    for i in range(4 * F):
        assert allowed(t, f"u{i}@x.test", "10.0.0.1")
        fail(t, f"u{i}@x.test", "10.0.0.1")
    assert t.retry_after_s("fresh@x.test", "10.0.0.1") == 10
    assert allowed(t, "fresh@x.test", "10.0.0.2")
    clock.t += 10
    fail(t, "another@x.test", "10.0.0.1")
    assert t.retry_after_s("fresh@x.test", "10.0.0.1") == 20


def test_distributed_attack_never_locks_the_owner_out_from_a_clean_address() -> None:
    """Past 100 failures across addresses an account allows one failure per address, and a
    clean address still gets its attempt."""
    t, _ = make()
    for i in range(20 * F):
        fail(t, "v@x.test", f"10.1.{i // 250}.{i % 250}")
    assert allowed(t, "v@x.test", "10.9.9.9")
    fail(t, "v@x.test", "10.9.9.8")
    assert t.retry_after_s("v@x.test", "10.9.9.8") == 10
    assert allowed(t, "v@x.test", "10.9.9.9")


def test_concurrent_attempts_cannot_outrun_the_limit() -> None:
    """Attempts held open together count against the limit before their verdicts arrive."""
    t, _ = make()
    fail(t, "a@x.test", "10.0.0.1", F - 1)
    with t.attempt("a@x.test", "10.0.0.1"), pytest.raises(RateLimited):
        t.check("a@x.test", "10.0.0.1")
    assert allowed(t, "a@x.test", "10.0.0.1")


def test_memory_is_bounded() -> None:
    """A spray of random accounts keeps at most max_keys counters of each kind."""
    t, clock = make(max_keys=50)
    for i in range(500):
        clock.t += 0.001
        fail(t, f"r{i}@x.test", f"10.2.{i // 250}.{i % 250}")
    assert len(t.pairs) <= 50 and len(t.accounts) <= 50 and len(t.addresses) <= 50
    clock.t += W
    fail(t, "last@x.test", "10.3.0.1")
    assert len(t.pairs) <= 50


def test_attempts_that_succeed_leave_no_state() -> None:
    """Successful logins store nothing."""
    t, _ = make()
    for i in range(10):
        with t.attempt(f"ok{i}@x.test", "10.0.0.1") as attempt:
            attempt.succeeded()
    assert len(t.pairs) == 0 and len(t.addresses) == 0 and len(t.accounts) == 0
