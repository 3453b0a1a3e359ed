"""What the broker still owes one client session: QoS 1/2 messages in flight and queued.

A session sends at most ``max_inflight`` QoS 1/2 messages before their acknowledgements
arrive; the rest wait in a queue bounded by ``max_queued``. Messages in flight keep their
packet ids; when a persistent session reconnects they are sent again first, PUBLISH with
DUP set or PUBREL where the PUBREC had arrived (MQTT-4.4.0-1), then the queue. QoS 0
messages are written straight through and never queued. Nothing here creates a task: the
connection's writer is a plain function, and acknowledgements are method calls from the
connection's reader. A queue half full is *congested*: publishers routing to it wait
(:meth:`Outbox.drained`) for the client's acknowledgements to catch up, which paces them
to the pace of their slowest subscriber instead of filling the queue in one burst.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from hexa.broker import codec
from hexa.broker.waiters import Waiters

Sink = Callable[[bytes], None]
#: a client that acknowledged nothing for this long is not waited for
PROGRESS_WINDOW_S = 1.0


@dataclass(slots=True)
class _Pending:
    topic: bytes  # codec.encode_topic
    payload: bytes
    qos: int
    retain: bool
    packet_id: int = 0
    #: PUBREC received, PUBREL sent (QoS 2)
    released: bool = False


class Outbox:
    """The outbound half of a session (its inbound QoS 2 ids live beside it)."""

    __slots__ = (
        "_next_id",
        "_waiters",
        "inflight",
        "max_inflight",
        "max_queued",
        "progressed_at",
        "queue",
        "received",
        "sink",
    )

    def __init__(self, *, max_inflight: int, max_queued: int) -> None:
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.inflight: dict[int, _Pending] = {}
        #: created when first needed (most sessions never queue, nor use QoS 2)
        self.queue: deque[_Pending] | None = None
        #: packet ids of inbound QoS 2 PUBLISHes routed but not yet released (PUBREL)
        self.received: set[int] | None = None
        self.sink: Sink | None = None
        self._next_id = 0
        self._waiters = Waiters()
        #: when the client last acknowledged something (or connected)
        self.progressed_at = 0.0

    @property
    def congested(self) -> bool:
        """Whether the queue is half full while the client keeps acknowledging: its
        publishers should wait. A client that stopped acknowledging is not waited for
        (its queue fills and it is disconnected)."""
        return (
            self.sink is not None
            and self.queue is not None
            and len(self.queue) * 2 >= self.max_queued
            and time.monotonic() - self.progressed_at < PROGRESS_WINDOW_S
        )

    async def drained(self) -> None:
        """Return once the queue is below half full (or the session is gone or away)."""
        if not self.congested:
            return
        await self._waiters.wait()

    @property
    def backlog(self) -> int:
        """QoS 1/2 messages not yet acknowledged, in flight and queued."""
        return len(self.inflight) + (len(self.queue) if self.queue else 0)

    def push(
        self, topic: bytes, payload: bytes, qos: int, retain: bool = False, *, force: bool = False
    ) -> bool:
        """Send or queue one message; False when the queue is full (nothing was done).
        ``force`` queues beyond the bound (a snapshot of retained messages)."""
        sink = self.sink
        if not qos:
            if sink is not None:
                sink(codec.publish(topic, payload, 0, None, retain))
            return True
        queue = self.queue
        if sink is not None and len(self.inflight) < self.max_inflight and not queue:
            self._send(_Pending(topic, payload, qos, retain), sink)
            return True
        if queue is None:
            queue = self.queue = deque()
        elif len(queue) >= self.max_queued and not force:
            return False
        queue.append(_Pending(topic, payload, qos, retain))
        return True

    def drop_oldest(self) -> bool:
        """Make room in a full queue (an offline session keeps the newest messages)."""
        if not self.queue:
            return False
        self.queue.popleft()
        return True

    def _send(self, message: _Pending, sink: Sink) -> None:
        pid = self._new_id()
        message.packet_id = pid
        self.inflight[pid] = message
        sink(codec.publish(message.topic, message.payload, message.qos, pid, message.retain))

    def _new_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self.inflight:
                return self._next_id
        raise RuntimeError("no free packet id")  # max_inflight < 65535 makes this unreachable

    def _refill(self) -> None:
        sink, queue = self.sink, self.queue
        while sink is not None and queue and len(self.inflight) < self.max_inflight:
            self._send(queue.popleft(), sink)
        if self._waiters and not self.congested:
            self._waiters.wake()

    # --- inbound QoS 2 (MQTT-4.3.3): routed on PUBLISH, its id remembered until PUBREL
    def first_receipt(self, pid: int) -> bool:
        """Note an inbound QoS 2 packet id; False if it was already noted (a resend)."""
        if self.received is None:
            self.received = set()
        elif pid in self.received:
            return False
        self.received.add(pid)
        return True

    def released(self, pid: int) -> None:
        if self.received is not None:
            self.received.discard(pid)

    # --- acknowledgements from the client
    def puback(self, pid: int) -> None:
        message = self.inflight.get(pid)
        if message is not None and message.qos == 1:
            del self.inflight[pid]
            self.progressed_at = time.monotonic()
            self._refill()

    def pubrec(self, pid: int) -> None:
        message = self.inflight.get(pid)
        if message is not None and message.qos == 2:
            message.released = True
            if self.sink is not None:
                self.sink(codec.ack(codec.PUBREL, pid))

    def pubcomp(self, pid: int) -> None:
        message = self.inflight.get(pid)
        if message is not None and message.released:
            del self.inflight[pid]
            self.progressed_at = time.monotonic()
            self._refill()

    # --- the connection comes and goes
    def attach(self, sink: Sink) -> None:
        """A connection (re)starts: resend what is in flight, then what is queued."""
        self.sink = sink
        self.progressed_at = time.monotonic()
        for pid, message in self.inflight.items():
            if message.released:
                sink(codec.ack(codec.PUBREL, pid))
            else:
                sink(
                    codec.publish(
                        message.topic,
                        message.payload,
                        message.qos,
                        pid,
                        message.retain,
                        dup=True,
                    )
                )
        self._refill()

    def detach(self) -> None:
        self.sink = None
        self._waiters.wake()

    def clear(self) -> None:
        self.inflight.clear()
        self.queue = None
        self.received = None
        self._waiters.wake()
