"""PostgreSQL and Redis restart in the middle of a run: the services reconnect by themselves
and the run completes with nothing lost.

The stack runs as real processes (three workers, one manager loop). PostgreSQL is the
session's embedded server, stopped with a fast shutdown (every connection cut) and started
again on the same socket; Redis is a private server stopped and started on the same port with
nothing kept on disk, so the restart also drops every queued message (the database is the
source of truth: the sweeper submits again what was lost).

The manager must ride through both restarts in the same process. A Celery worker used to exit
when Redis went away while it held unacknowledged messages (kombu 5.7: ``restore_unacked`` on a
closed connection raised ``AttributeError: 'NoneType' object has no attribute 'hostname'``,
"Unrecoverable error"); ``data_transfer.broker`` fixes that, and the test fails if a worker's log
shows it again. A worker that exits for any other reason is started again by the harness, as
compose's ``restart: unless-stopped`` does in production, and the test prints how often.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.chaos.harness import (
    RestartableRedis,
    all_archived,
    chaos_stack,
    check_nothing_lost,
    restart_postgres,
)


@pytest.mark.timeout(420)
def test_postgres_and_redis_restarts_mid_run(
    pg_server, pg_url: str, tmp_path: Path, s3_server
) -> None:
    redis = RestartableRedis(tmp_path / "redis")
    redis.start()
    cs = chaos_stack(
        pg_url, tmp_path / "stack", s3_server, redis.url, CCAT_TRANSFER_MAX_RETRIES="50"
    )
    cs.supervise = True
    try:
        cs.start_all()
        # (a worker that starts while the database is down exits: wait until all are up)
        cs.wait_ready()
        filed = cs.file_wave(6, 10, seed=31)
        cs.pause(4)  # the pipeline is busy: packages being built and moved
        restart_postgres(pg_server, down_s=4)
        filed += cs.file_wave(6, 10, seed=32)
        cs.pause(4)
        redis.restart(down_s=4)
        filed += cs.file_wave(6, 10, seed=33)
        cs.pause(3)
        restart_postgres(pg_server, down_s=2)
        redis.restart(down_s=2)
        waited = cs.wait_until(all_archived(cs, filed), 300, "every file archived after restarts")
        figures = check_nothing_lost(cs, filed)
        manager = cs.procs["manager"]
        assert manager.starts == 1 and manager.alive, "the manager did not survive the restarts"
        for name, proc in cs.procs.items():  # workers: at most one exit per Redis restart
            assert proc.starts <= 1 + redis.restarts, f"{name} started {proc.starts} times"
            # kombu's restore of unacknowledged messages on a closed connection (fixed by
            # data_transfer.broker) must not end a worker any more
            died = re.findall(
                r"Unrecoverable error.*?'hostname'", proc.log.read_text(errors="replace")
            )
            assert not died, f"{name}: {died[0]}"
    finally:
        cs.stop_all()
        cs.stack.engine.dispose()
        redis.stop()
    manager_log = cs.procs["manager"].log.read_text()
    failed_passes = len(re.findall(r"pass failed; retrying after the sleep", manager_log))
    print(
        f"\nrestarts: PostgreSQL 2, Redis {redis.restarts}; finished {waited:.0f} s after the "
        f"last; manager passes that failed meanwhile: {failed_passes}; worker exits restarted"
        f" by the supervisor: {cs.unplanned_exits or 'none'}; no loss: {figures}"
    )
