"""The Redis broker transport of the workers: kombu's, with one fix for a Redis restart.

With ``acks_late``, a worker holds every task it runs or has reserved as an unacknowledged
message. When the broker connection breaks, Celery closes the connection and restarts its
consumer; every channel closed on the way hands its unacknowledged messages back to the
queue (kombu's ``restore_unacked``). kombu 5.7 gets two things wrong there while Redis is
away, and either ends the worker with "Unrecoverable error" (seen in tests/chaos): closing the
connection stops at the first channel whose restore fails, clears the transport's connection
details and leaves the other channels open; when Celery then closes those,

* the restore looks up the broker address on the cleared connection details and raises
  ``AttributeError: 'NoneType' object has no attribute 'hostname'``;
* had it found the address, the restore would raise a connection error from inside the
  consumer's restart, where Celery does not expect one.

This transport keeps each channel's connection details from when it was opened, and a restore
that cannot reach Redis logs a warning (how many messages, and why) instead of raising. Nothing
is lost by that: the messages stay in Redis's set of unacknowledged messages, which kombu
restores to their queues after the visibility timeout (``CCAT_TRANSFER_VISIBILITY_TIMEOUT_S``);
if Redis lost them (a restart with nothing kept on disk), the operations database still says
what is unfinished, and the managers and the recovery sweeper submit it again.

:func:`install` makes ``redis://`` URLs use it in this process; ``make_celery`` calls it.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

#: the transport class, as kombu resolves it from an alias
TRANSPORT_PATH = "data_transfer.broker:Transport"


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS; a restore that cannot reach Redis warns instead of raising."""

    def restore_unacked(self, client: Any = None) -> None:
        """Hand the unacknowledged messages back to their queues, if Redis can be reached."""
        waiting = len(self._delivered)
        try:
            super().restore_unacked(client)
        except Transport.connection_errors as exc:
            log.warning(
                "%d unacknowledged message(s) not handed back now: Redis is not reachable "
                "(%s: %s). They stay in Redis's unacknowledged set and return to their queues "
                "after the visibility timeout; the recovery sweeper resubmits anything Redis "
                "lost.",
                waiting,
                type(exc).__name__,
                exc,
            )
            self._delivered.clear()


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, which remembers its connection details from when it opened."""

    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._opened_with = self.connection.client

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        transport = self.connection
        if transport.client is not None or self._opened_with is None:
            return super()._connparams(asynchronous=asynchronous)
        # the connection was closed (its details cleared) while this channel stayed open
        transport.client = self._opened_with
        try:
            return super()._connparams(asynchronous=asynchronous)
        finally:
            transport.client = None


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


def install() -> None:
    """Make ``redis://`` broker URLs use :class:`Transport` in this process."""
    if kombu_transport.TRANSPORT_ALIASES.get("redis") == TRANSPORT_PATH:
        return
    kombu_transport.TRANSPORT_ALIASES["redis"] = TRANSPORT_PATH
    # a connection made before this call resolved the alias already: forget that
    kombu_transport._transport_cache.pop("redis", None)
