"""The recovery sweeper against a real Redis: a heartbeat store that just lost its keys is not
believed, and a task that never started is submitted again without using up a retry."""

from __future__ import annotations

import time

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import Status
from data_transfer import state
from data_transfer.heartbeat import MEMORY_KEY, RedisHeartbeats, task_key
from data_transfer.inline import QueueDispatcher
from data_transfer.managers import run_pass
from data_transfer.operations import Context

from .stack import RedisServer, Stack, transfer_settings

STALE_S = 1.0


def scheduled_package(stack: Stack, ctx: Context) -> int:
    """A raw data package SCHEDULED, its task queued but not run."""
    stack.file_observation(files=1, seed=11)
    d = QueueDispatcher()
    run_pass("raw_data_packages", ctx.engine, ctx.settings, d)
    (task,) = d.pending
    return int(task.payload)


def package(stack: Stack, pkg_id: int) -> m.RawDataPackage:
    with Session(stack.engine) as s:
        return s.get(m.RawDataPackage, pkg_id)


def test_a_restarted_heartbeat_store_is_not_taken_for_dead_workers(
    stack: Stack, redis_server: RedisServer
) -> None:
    """Redis came back empty (no persistence): every live task's key is gone until its next
    beat. The sweeper waits one heartbeat lifetime before it believes a missing key."""
    ctx = Context(
        engine=stack.engine,
        settings=transfer_settings(stack.root, stale_after_s=STALE_S, heartbeat_interval_s=0.3),
    )
    hb = RedisHeartbeats(redis_server.url)
    pkg_id = scheduled_package(stack, ctx)
    with Session(stack.engine) as s, s.begin():
        assert state.claim(s, "raw_data_package", pkg_id)  # a worker has it
    redis.Redis.from_url(redis_server.url).delete(MEMORY_KEY)  # Redis restarted: all forgotten
    time.sleep(STALE_S + 0.2)
    assert not hb.alive(task_key("raw_data_package", pkg_id))

    report = run_pass("recovery", ctx.engine, ctx.settings, QueueDispatcher(), hb)

    assert report.created == 0
    assert any("left alone" in n for n in report.notes), report.notes
    assert package(stack, pkg_id).status == Status.IN_PROGRESS
    # one lifetime later a missing key means what it says: the worker is gone
    time.sleep(STALE_S + 0.2)
    report = run_pass("recovery", ctx.engine, ctx.settings, QueueDispatcher(), hb)
    assert report.created == 1
    pkg = package(stack, pkg_id)
    assert pkg.status == Status.PENDING and pkg.retry_count == 1
    assert pkg.failure_reason.startswith("StalledTaskError: no heartbeat")


def test_a_task_that_never_started_is_sent_again_without_using_a_retry(stack: Stack) -> None:
    """A long queue (or a lost message) kept the task from starting: it did not fail, so no
    attempt is counted; after four such waits it is still not FAILED."""
    ctx = Context(
        engine=stack.engine,
        settings=transfer_settings(
            stack.root, stale_after_s=0.1, scheduled_timeout_s=0.5, max_retries=2
        ),
    )
    pkg_id = scheduled_package(stack, ctx)
    for _ in range(4):
        time.sleep(0.7)
        report = run_pass("recovery", ctx.engine, ctx.settings, QueueDispatcher())
        assert report.created == 1
        pkg = package(stack, pkg_id)
        assert pkg.status == Status.PENDING and pkg.retry_count == 0
        assert pkg.failure_reason.startswith("NotStartedError: task not started ")
        d = QueueDispatcher()
        run_pass("raw_data_packages", ctx.engine, ctx.settings, d)  # submitted again
        assert [t.payload for t in d.pending] == [pkg_id]
    with Session(stack.engine) as s:
        assert s.scalars(select(m.RawDataPackage.status)).one() == Status.SCHEDULED
