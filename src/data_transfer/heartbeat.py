"""Heartbeats: tasks prove they are alive; services announce they are running.

Both live in Redis with a TTL, as in the real system (``health:{service_type}:{name}``, TTL
90 s, refreshed every 30 s). A task's key is ``ccat:task:{kind}:{id}``; the recovery sweeper
resets IN_PROGRESS records whose key has expired. :class:`MemoryHeartbeats` is the same
interface in memory for single-process runs (``run-once`` without a broker, property tests).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Protocol

SERVICE_PREFIX = "health:data_transfer:"
TASK_PREFIX = "ccat:task:"


class Heartbeats(Protocol):
    """Where heartbeats are kept."""

    def beat(self, key: str, ttl_s: float) -> None:
        """Set ``key`` alive for ``ttl_s`` seconds."""
        ...

    def alive(self, key: str) -> bool:
        """True while ``key`` has not expired."""
        ...

    def clear(self, key: str) -> None:
        """Forget ``key``."""
        ...

    def keys(self, prefix: str) -> list[str]:
        """Live keys starting with ``prefix``."""
        ...


class MemoryHeartbeats:
    """In-process heartbeats (one process only)."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def beat(self, key: str, ttl_s: float) -> None:
        with self._lock:
            self._until[key] = time.monotonic() + ttl_s

    def alive(self, key: str) -> bool:
        with self._lock:
            return self._until.get(key, 0.0) > time.monotonic()

    def clear(self, key: str) -> None:
        with self._lock:
            self._until.pop(key, None)

    def keys(self, prefix: str) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return sorted(k for k, t in self._until.items() if k.startswith(prefix) and t > now)


class RedisHeartbeats:
    """Heartbeats in Redis (shared by every host of the data center)."""

    def __init__(self, url: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    def beat(self, key: str, ttl_s: float) -> None:
        self._redis.set(key, b"alive", px=max(int(ttl_s * 1000), 1))

    def alive(self, key: str) -> bool:
        return bool(self._redis.exists(key))

    def clear(self, key: str) -> None:
        self._redis.delete(key)

    def keys(self, prefix: str) -> list[str]:
        return sorted(k.decode() for k in self._redis.scan_iter(match=prefix + "*", count=500))


def task_key(kind: str, record_id: object) -> str:
    """The heartbeat key of one task."""
    return f"{TASK_PREFIX}{kind}:{record_id}"


@contextlib.contextmanager
def beating(hb: Heartbeats, key: str, interval_s: float, ttl_s: float) -> Iterator[None]:
    """Keep ``key`` alive from a background thread while the block runs; clear it after."""
    stop = threading.Event()
    hb.beat(key, ttl_s)

    def loop() -> None:
        while not stop.wait(interval_s):
            with contextlib.suppress(Exception):  # a missed beat is retried next interval
                hb.beat(key, ttl_s)

    thread = threading.Thread(target=loop, name=f"heartbeat {key}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            hb.clear(key)
