"""Tasks waiting for a condition that one side signals (room in a queue, a connection's
end): a list of futures made only when somebody waits."""

from __future__ import annotations

import asyncio


class Waiters:
    """``await wait()`` until the next :meth:`wake`."""

    __slots__ = ("_futures",)

    def __init__(self) -> None:
        self._futures: list[asyncio.Future[None]] | None = None

    def __bool__(self) -> bool:
        return bool(self._futures)

    async def wait(self) -> None:
        future = asyncio.get_running_loop().create_future()
        if self._futures is None:
            self._futures = []
        self._futures.append(future)
        try:
            await future
        finally:
            if self._futures and future in self._futures:
                self._futures.remove(future)

    def wake(self) -> None:
        futures, self._futures = self._futures, None
        for future in futures or ():
            if not future.done():
                future.set_result(None)
