"""The Celery application: reliable delivery for long, id-only tasks.

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a task is acknowledged only when it
  finished; if the worker dies, the broker hands it to another worker.
* ``worker_prefetch_multiplier = 1``: a worker takes one long task at a time, so a 50 GB copy
  does not hold other tasks hostage behind it.
* JSON payloads holding only ids: the database is the source of truth, tasks re-read state.
* No default queue traffic: every task is sent to its ``{site}_{location}_{operation}`` queue.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

from . import broker
from .settings import TransferSettings, load_transfer_settings

log = logging.getLogger("data_transfer.celery")

#: Celery task name of each operation kind.
TASK_NAMES = {
    "raw_data_package": "ccat.transfer.create_raw_data_package",
    "data_transfer_package": "ccat.transfer.create_data_transfer_package",
    "data_transfer": "ccat.transfer.transfer",
    "unpack": "ccat.transfer.unpack",
    "long_term_archive_transfer": "ccat.transfer.archive",
    "staging_job": "ccat.transfer.stage",
    "deletion": "ccat.transfer.delete",
    "fixity": "ccat.transfer.fixity",
}


def make_celery(settings: TransferSettings | None = None) -> Celery:
    """Build the Celery app from the settings and register the tasks."""
    settings = settings or load_transfer_settings()
    broker.install()  # redis:// with the fix for a Redis restart (data_transfer.broker)
    app = Celery("ccat_data_transfer", broker=settings.broker_url, backend=settings.result_backend)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_track_started=True,
        task_ignore_result=settings.result_backend is None,
        task_default_queue="ccat_transfer_default",
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        enable_utc=True,
    )
    _register(app, settings)
    _announce_workers(settings)
    return app


def _announce_workers(settings: TransferSettings) -> None:
    """While a worker runs, keep ``health:data_transfer:worker_<name>`` alive in Redis
    (TTL 90 s, refreshed every 30 s), as every service of the real system does."""
    from celery.signals import worker_ready, worker_shutdown

    from .heartbeat import SERVICE_PREFIX, RedisHeartbeats

    stop = threading.Event()

    @worker_ready.connect(weak=False)
    def _ready(sender: Any = None, **_: Any) -> None:
        key = f"{SERVICE_PREFIX}worker_{getattr(sender, 'hostname', 'unknown')}"
        hb = RedisHeartbeats(settings.heartbeat_redis_url)

        def loop() -> None:
            while True:
                try:
                    hb.beat(key, 90)
                except Exception:  # Redis away: the key expires and the worker shows dead
                    log.warning("could not refresh %s", key)
                if stop.wait(30):
                    break
            try:
                hb.clear(key)
            except Exception:
                log.debug("could not clear %s", key)

        threading.Thread(target=loop, name="health", daemon=True).start()

    @worker_shutdown.connect(weak=False)
    def _shutdown(**_: Any) -> None:
        stop.set()


_ctx_lock = threading.Lock()
_ctx: Any = None


def worker_context(settings: TransferSettings) -> Any:
    """The per-process operation context (database engine, Redis heartbeats)."""
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            from ccat_ops_db.db import make_engine

            from .heartbeat import RedisHeartbeats
            from .operations import Context

            _ctx = Context(
                engine=make_engine(),
                settings=settings,
                heartbeats=RedisHeartbeats(settings.heartbeat_redis_url),
            )
        return _ctx


def _register(app: Celery, settings: TransferSettings) -> None:
    from celery import current_task

    from ccat_ops_db.logs import log_context, task_log_ids

    from .operations import OPERATIONS

    for kind, task_name in TASK_NAMES.items():
        op = OPERATIONS[kind]

        def run(payload: Any, _op: Any = op, _kind: str = kind) -> dict[str, str]:
            ctx = worker_context(settings)
            if _kind == "staging_job":
                payload = int(payload)
            task_id = getattr(getattr(current_task, "request", None), "id", None)
            with log_context(**task_log_ids(_kind, payload, task_id)):
                outcome = _op(ctx, payload)
                log.info("%s %s: %s %s", _kind, payload, outcome.result, outcome.detail)
            return outcome.as_dict()

        app.task(name=task_name, bind=False, acks_late=True, reject_on_worker_lost=True)(run)


class CeleryDispatcher:
    """Managers submit tasks through this (to the named queue, never the default one)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def submit(self, kind: str, payload: Any, queue: str) -> None:
        """Send the task of ``kind`` to ``queue``."""
        self.app.send_task(TASK_NAMES[kind], args=[payload], queue=queue)
