"""A client's publish rate: a token bucket that makes a flooding client wait, not lose.

Each device or integration session may publish ``rate`` messages a second on average and
``rate`` at once after a quiet second. A publish beyond that is not dropped: the client's
reader waits until the bucket has a token again, so the client's own packets queue in its
socket (TCP back-pressure) while every other client is served as before. Nothing a client
sent is lost and nothing acknowledged is held back; a QoS 1 publisher simply sees its
PUBACKs at the allowed pace.
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second, at most ``rate`` (one second's worth, at least 1) saved."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.burst = max(rate, 1.0)
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> float:
        """Take a token; 0 when one was there, else how many seconds the caller must wait
        before going on (the token is owed: waits add up while the flood lasts)."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.tokens = (self.burst if tokens > self.burst else tokens) - 1.0
        self.stamp = now
        return 0.0 if self.tokens >= 0.0 else -self.tokens / self.rate
