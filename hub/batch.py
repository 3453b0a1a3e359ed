"""Database work that many callers ask for at about the same time, done in one go.

A storm of device connects asks the database the same question (this device's row) or
makes the same change (this device is online) for hundreds of devices within a few
milliseconds. :class:`Batched` does the keys asked for in one event-loop turn, and
those asked for while its previous call ran, with one call of its ``run`` (one
statement for many rows instead of one per row). Nothing is cached: every answer comes
from a call that started after it was asked for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Batched(Generic[K, V]):
    """``await one(key)``: ``run``'s value for ``key`` (None when it has none), once the
    call of ``run`` that took ``key`` is done (its exception raised to every caller)."""

    def __init__(self, run: Callable[[list[K]], Awaitable[dict[K, V]]]) -> None:
        self._run = run
        #: the keys asked for since the running call started: the next one's
        self._wanted: dict[K, asyncio.Future[V | None]] | None = None
        self._one_at_a_time = asyncio.Lock()

    async def one(self, key: K) -> V | None:
        wanted = self._wanted
        first = wanted is None
        if wanted is None:
            wanted = self._wanted = {}
        waiter = wanted.get(key)
        if waiter is None:
            waiter = wanted[key] = asyncio.get_running_loop().create_future()
        if first:  # this caller runs the batch for everyone in it
            try:
                await asyncio.sleep(0)  # the callers of this loop turn join in
                async with self._one_at_a_time:  # meanwhile the next batch gathers
                    if self._wanted is wanted:
                        self._wanted = None
                    found = await self._run(list(wanted))
            except BaseException as exc:  # the others of the batch must not wait forever
                if self._wanted is wanted:
                    self._wanted = None
                failed = exc if isinstance(exc, Exception) else LookupError("lookup cancelled")
                for w in wanted.values():
                    if not w.done():
                        w.set_exception(failed)
                if not isinstance(exc, Exception):
                    waiter.exception()  # this caller sees the cancellation instead
                    raise
            else:
                for k, w in wanted.items():
                    if not w.done():
                        w.set_result(found.get(k))
        return await asyncio.shield(waiter)  # one caller giving up leaves the others
