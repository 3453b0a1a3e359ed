"""Login throttling: exponential backoff that slows a guesser, not the account's owner.

Three kinds of failure counter, each forgotten ``2 * window_s`` after its last failure (a
quiet window after the longest backoff):

- **pair** (account, address): ``max_failures`` free failures, then each further attempt
  from that address for that account waits ``base_s * 2^(n - max_failures)`` after the last
  failure (capped at ``window_s``). A success resets the pair.
- **address** (any account): failures from one address count here, at most
  ``max_failures`` per pair, so hammering one account never slows other accounts' logins
  from the same address. From ``4 * max_failures`` failures on (password spraying), every
  login from the address backs off the same way.
- **account** (any address): from ``20 * max_failures`` failures on (a distributed attack),
  each address's free allowance for that account drops to one failure. An address with no
  failure against the account is never held back by this rule, so the owner's right
  password from a clean address always gets through.

Counters live in memory, capped at ``max_keys`` per kind: expired ones are dropped first,
then the least recently failed.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from hexa.hub.errors import RateLimited

#: the first backoff; each further failure doubles it, up to the window.
BACKOFF_BASE_S = 10.0
#: the per-address limit is this many times ``max_failures`` (failures across accounts).
ADDRESS_FACTOR = 4
#: the per-account limit is this many times ``max_failures`` (failures across addresses).
ACCOUNT_FACTOR = 20
#: counters kept per kind (pairs, addresses, accounts) before the oldest are dropped.
MAX_KEYS = 100_000


@dataclass
class _Counter:
    failures: int = 0
    last: float = 0.0
    pending: int = 0  # attempts between check and verdict


class _Table:
    """Counters of one kind, bounded in number, least recently failed first."""

    def __init__(self, ttl_s: float, max_keys: int) -> None:
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self._items: OrderedDict[str, _Counter] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def peek(self, key: str, now: float) -> _Counter:
        """The live counter of ``key`` (a fresh one, not stored, if none or expired)."""
        c = self._items.get(key)
        if c is None:
            return _Counter()
        if c.pending == 0 and now - c.last >= self.ttl_s:
            del self._items[key]
            return _Counter()
        return c

    def get(self, key: str, now: float) -> _Counter:
        """The live counter of ``key``, stored (and made the most recent)."""
        c = self.peek(key, now)
        if key in self._items:
            self._items.move_to_end(key)
        else:
            self._make_room(now)
            self._items[key] = c
        return c

    def pop(self, key: str) -> None:
        self._items.pop(key, None)

    def release(self, key: str, now: float) -> None:
        c = self._items.get(key)
        if c is not None:
            c.pending = max(0, c.pending - 1)
            if c.failures == 0 and c.pending == 0:
                del self._items[key]

    def _make_room(self, now: float) -> None:
        if len(self._items) < self.max_keys:
            return
        for key in [
            k for k, c in self._items.items() if c.pending == 0 and now - c.last >= self.ttl_s
        ]:
            del self._items[key]
        while len(self._items) >= self.max_keys:
            self._items.popitem(last=False)


class LoginThrottle:
    """Failure counters per (account, address), per address and per account, in memory."""

    def __init__(
        self,
        max_failures: int,
        window_s: float,
        *,
        base_s: float = BACKOFF_BASE_S,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.base_s = base_s
        self.address_limit = max_failures * ADDRESS_FACTOR
        self.account_limit = max_failures * ACCOUNT_FACTOR
        self.clock = clock
        # forgotten only a full window after the longest backoff ends: an attacker who waits
        # out the capped backoff meets the cap again, not a fresh allowance
        self.pairs = _Table(2 * window_s, max_keys)
        self.addresses = _Table(2 * window_s, max_keys)
        self.accounts = _Table(2 * window_s, max_keys)

    def backoff_s(self, failures: int, free: int) -> float:
        """How long after the last failure the next attempt waits (0: no wait)."""
        if failures < free:
            return 0.0
        return min(self.window_s, self.base_s * 2 ** min(failures - free, 32))

    def retry_after_s(self, email: str, address: str | None) -> int:
        """Seconds until a login for ``email`` from ``address`` is allowed (0: now)."""
        now = self.clock()
        pair = self.pairs.peek(_pair(email, address), now)
        account = self.accounts.peek(email, now)
        free = 1 if account.failures >= self.account_limit else self.max_failures
        waits = [self._wait(pair, free, now)]
        if address:
            waits.append(self._wait(self.addresses.peek(address, now), self.address_limit, now))
        wait = max(waits)
        return 0 if wait <= 0 else max(1, math.ceil(wait))

    def check(self, email: str, address: str | None) -> None:
        """Raise :class:`RateLimited` (with ``Retry-After``) if the attempt must wait."""
        retry = self.retry_after_s(email, address)
        if retry:
            raise RateLimited("too many failed logins, try again later", retry_after_s=retry)

    @contextmanager
    def attempt(self, email: str, address: str | None) -> Iterator[LoginAttempt]:
        """Check, then hold the attempt as pending until its verdict, so that concurrent
        guesses cannot all slip through before the first failure is counted."""
        self.check(email, address)
        now = self.clock()
        keys = [(self.pairs, _pair(email, address))]
        if address:
            keys.append((self.addresses, address))
        for table, key in keys:
            table.get(key, now).pending += 1
        try:
            yield LoginAttempt(self, email, address)
        finally:
            now = self.clock()
            for table, key in keys:
                table.release(key, now)

    def failed(self, email: str, address: str | None) -> None:
        now = self.clock()
        pair = self.pairs.get(_pair(email, address), now)
        if address and pair.failures < self.max_failures:
            _record(self.addresses.get(address, now), now)
        _record(pair, now)
        _record(self.accounts.get(email, now), now)

    def succeeded(self, email: str, address: str | None) -> None:
        self.pairs.pop(_pair(email, address))

    def _wait(self, c: _Counter, free: int, now: float) -> float:
        if c.pending and c.failures + c.pending >= free:
            return 1.0  # guesses in flight would reach the limit: one at a time
        if c.failures == 0:
            return 0.0
        backoff = self.backoff_s(c.failures, free)
        return c.last + backoff - now if backoff else 0.0


class LoginAttempt:
    """One login attempt admitted by the throttle; report its verdict."""

    def __init__(self, throttle: LoginThrottle, email: str, address: str | None) -> None:
        self._throttle = throttle
        self._email = email
        self._address = address

    def failed(self) -> None:
        self._throttle.failed(self._email, self._address)

    def succeeded(self) -> None:
        self._throttle.succeeded(self._email, self._address)


def _pair(email: str, address: str | None) -> str:
    return f"{address or ''} {email}"


def _record(c: _Counter, now: float) -> None:
    c.failures += 1
    c.last = now
