"""Who receives a message: subscriptions by topic filter, and the retained messages.

Exact filters (one per device and topic on a hub) are one dict lookup; wildcard filters
live in a trie walked level by level, so matching costs the topic's depth, not the number
of subscriptions. A client with several matching filters is found once, with the highest
of their QoS (MQTT-3.3.5-1). Topics beginning with ``$`` are not matched by filters that
begin with a wildcard (MQTT-4.7.2-1).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

S = TypeVar("S")


class _Node(Generic[S]):
    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] = {}
        self.subscribers: dict[str, tuple[S, int]] = {}


def is_wildcard(flt: str) -> bool:
    return "+" in flt or "#" in flt


class Subscriptions(Generic[S]):
    """Topic filter → subscribers (client id → (subscriber, granted QoS))."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, tuple[S, int]]] = {}
        self._root: _Node[S] = _Node()
        self._filters = 0

    def __len__(self) -> int:
        """The number of distinct filters with at least one subscriber."""
        return self._filters

    def add(self, flt: str, client_id: str, subscriber: S, qos: int) -> None:
        """Subscribe (or replace the QoS of an existing subscription, MQTT-3.8.4-3)."""
        table = self._table(flt, create=True)
        assert table is not None
        if not table:
            self._filters += 1
        table[client_id] = (subscriber, qos)

    def remove(self, flt: str, client_id: str) -> bool:
        """Unsubscribe; whether there was such a subscription."""
        if not is_wildcard(flt):
            table = self._exact.get(flt)
            if table is None or table.pop(client_id, None) is None:
                return False
            if not table:
                del self._exact[flt]
                self._filters -= 1
            return True
        path = [self._root]
        for level in flt.split("/"):
            child = path[-1].children.get(level)
            if child is None:
                return False
            path.append(child)
        if path[-1].subscribers.pop(client_id, None) is None:
            return False
        if not path[-1].subscribers:
            self._filters -= 1
        levels = flt.split("/")
        for depth in range(len(levels), 0, -1):  # prune the branch that is now empty
            node = path[depth]
            if node.subscribers or node.children:
                break
            del path[depth - 1].children[levels[depth - 1]]
        return True

    def _table(self, flt: str, *, create: bool) -> dict[str, tuple[S, int]] | None:
        if not is_wildcard(flt):
            table = self._exact.get(flt)
            if table is None and create:
                table = self._exact[flt] = {}
            return table
        node = self._root
        for level in flt.split("/"):
            child = node.children.get(level)
            if child is None:
                if not create:
                    return None
                child = node.children[level] = _Node()
            node = child
        return node.subscribers

    def match(self, topic: str) -> dict[str, tuple[S, int]]:
        """Every subscriber of ``topic``, once, with the highest granted QoS."""
        found: dict[str, tuple[S, int]] = {}
        exact = self._exact.get(topic)
        if exact:
            found.update(exact)
        root = self._root
        if not root.children:
            return found
        levels = topic.split("/")
        dollar = topic.startswith("$")
        self._walk(root, levels, 0, found, dollar)
        return found

    def _walk(
        self,
        node: _Node[S],
        levels: list[str],
        i: int,
        found: dict[str, tuple[S, int]],
        dollar: bool,
    ) -> None:
        children = node.children
        wild_ok = not (dollar and i == 0)
        if wild_ok:
            multi = children.get("#")
            if multi is not None:  # "a/#" matches "a" too (MQTT-4.7.1-2)
                _merge(found, multi.subscribers)
        self._descend(children.get(levels[i]), levels, i, found, dollar)
        if wild_ok:
            self._descend(children.get("+"), levels, i, found, dollar)

    def _descend(
        self,
        node: _Node[S] | None,
        levels: list[str],
        i: int,
        found: dict[str, tuple[S, int]],
        dollar: bool,
    ) -> None:
        """Continue the walk at ``node``, the child matching level ``i`` (by name or +)."""
        if node is None:
            return
        if i + 1 == len(levels):
            _merge(found, node.subscribers)
            grand = node.children.get("#")
            if grand is not None:
                _merge(found, grand.subscribers)
        elif node.children:
            self._walk(node, levels, i + 1, found, dollar)

    def filters(self) -> Iterator[str]:
        """Every filter with at least one subscriber."""
        yield from self._exact

        def walk(node: _Node[S], prefix: list[str]) -> Iterator[str]:
            if node.subscribers:
                yield "/".join(prefix)
            for level, child in node.children.items():
                yield from walk(child, [*prefix, level])

        for level, child in self._root.children.items():
            yield from walk(child, [level])


def _merge(found: dict[str, tuple[S, int]], subscribers: dict[str, tuple[S, int]]) -> None:
    for cid, entry in subscribers.items():
        have = found.get(cid)
        if have is None or have[1] < entry[1]:
            found[cid] = entry


def matches(topic: str, flt: str) -> bool:
    """Whether a topic name matches a filter (for one-off checks such as retained replay)."""
    if topic.startswith("$") and flt[:1] in ("+", "#"):
        return False
    if not is_wildcard(flt):
        return topic == flt
    t, f = topic.split("/"), flt.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(t) == len(f)


@dataclass(frozen=True, slots=True)
class Retained:
    """A retained message (MQTT-3.3.1-5)."""

    topic: str
    payload: bytes
    qos: int


class RetainedStore:
    """Topic → its retained message."""

    def __init__(self) -> None:
        self._by_topic: dict[str, Retained] = {}

    def __len__(self) -> int:
        return len(self._by_topic)

    def get(self, topic: str) -> Retained | None:
        return self._by_topic.get(topic)

    def put(self, topic: str, payload: bytes, qos: int) -> None:
        """Retain ``payload``; an empty payload clears the topic (MQTT-3.3.1-10, -11)."""
        if payload:
            self._by_topic[topic] = Retained(topic, payload, qos)
        else:
            self._by_topic.pop(topic, None)

    def matching(self, flt: str) -> list[Retained]:
        """The retained messages a new subscription to ``flt`` receives."""
        if not is_wildcard(flt):
            found = self._by_topic.get(flt)
            return [] if found is None else [found]
        return [r for topic, r in self._by_topic.items() if matches(topic, flt)]

    def clear(self) -> None:
        self._by_topic.clear()
