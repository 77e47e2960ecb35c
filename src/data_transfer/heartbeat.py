"""Heartbeats: tasks prove they are alive; services announce they are running.

Both live in Redis with a TTL, as in the real system (``health:{service_type}:{name}``, TTL
90 s, refreshed every 30 s). A task's key is ``ccat:task:{kind}:{id}``; the recovery sweeper
resets IN_PROGRESS records whose key has expired. :class:`MemoryHeartbeats` is the same
interface in memory for single-process runs (``run-once`` without a broker, property tests).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

log = logging.getLogger(__name__)

SERVICE_PREFIX = "health:data_transfer:"
TASK_PREFIX = "ccat:task:"
#: When Redis started keeping this data center's heartbeats (see :meth:`Heartbeats.memory_s`).
MEMORY_KEY = "ccat:heartbeats:since"


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

    def memory_s(self) -> float:
        """For how long this store has been keeping heartbeats: a missing key means a dead
        task only once this exceeds a heartbeat's time to live (a Redis restarted without
        persistence has forgotten every live task's key until its next beat)."""
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

    def memory_s(self) -> float:
        # it lives as long as the process whose tasks beat into it: it forgets nothing
        return float("inf")


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

    def memory_s(self) -> float:
        # a marker set once (no TTL) in Redis's own clock: gone after a restart without
        # persistence, a flush or an eviction, and then set again from now
        seconds, micros = self._redis.time()
        now = seconds + micros / 1e6
        self._redis.set(MEMORY_KEY, repr(now), nx=True)
        since = self._redis.get(MEMORY_KEY)
        return max(now - float(since), 0.0) if since else 0.0


def task_key(kind: str, record_id: object) -> str:
    """The heartbeat key of one task."""
    return f"{TASK_PREFIX}{kind}:{record_id}"


@contextlib.contextmanager
def repeating(fn: Callable[[], None], interval_s: float, name: str) -> Iterator[None]:
    """Call ``fn`` now, then every ``interval_s`` from a background thread while the block
    runs. A failed call in the thread is logged and tried again at the next interval."""
    stop = threading.Event()
    fn()

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                fn()
            except Exception as exc:
                log.warning(
                    "%s: %s: %s (tried again in %g s)", name, type(exc).__name__, exc, interval_s
                )

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@contextlib.contextmanager
def beating(hb: Heartbeats, key: str, interval_s: float, ttl_s: float) -> Iterator[None]:
    """Keep ``key`` alive from a background thread while the block runs; clear it after."""
    try:
        with repeating(lambda: hb.beat(key, ttl_s), interval_s, f"heartbeat {key}"):
            yield
    finally:
        with contextlib.suppress(Exception):
            hb.clear(key)
