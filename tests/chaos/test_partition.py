"""Partition: the telescope is cut off from Cologne for a while; filing goes on at the
telescope, the transfers wait with bounded retries (no retry storm), and everything completes
once the link is back.

The link is real: the Cologne worker pulls the telescope's BUFFER with rsync over ssh (the
private sshd of the transfer tests), through a TCP relay on 127.0.0.1 that the test owns.
Cutting the link closes the relay's listening socket and every connection through it (ssh
then gets "connection refused", as across a dead WAN link); healing opens it again on the same
port. The telescope's worker mounts its BUFFER directly (``CCAT_TRANSFER_LOCAL_HOSTS``).

During the cut the instrument goes on observing: it writes files at the SOURCE and files them
through the real API process (``ccat-api serve`` on loopback, tests/api_server.py).

The policy under test (docs/data-transfer.md, "Partitions"): a transfer retries
``max_retries`` times with exponential back-off, then is FAILED with its network reason; the
recovery manager gives a FAILED transfer with a network or storage reason a fresh round of
retries once ``partition_retry_s`` has passed since its last failure. So attempts per transfer
are bounded by ``(max_retries + 1) * (cut / partition_retry_s + 1)``, and the link heals
without a person.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import random
import re
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import Status
from tests.api_server import ApiServer, running_api
from tests.chaos.harness import (
    ChaosStack,
    all_archived,
    chaos_stack,
    check_nothing_lost,
    flush_redis,
)
from tests.transfer.servers import SshServer
from tests.transfer.stack import RedisServer, free_port

MAX_RETRIES = 2
PARTITION_RETRY_S = 6.0
CUT_S = 25.0


class Relay:
    """A TCP relay 127.0.0.1:port -> 127.0.0.1:target that can be cut and healed."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.accepted = 0

    def heal(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self.listener = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            if self.listener is not None:
                self.listener.close()
                self.listener = None
            for c in self.conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
            self.conns.clear()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def _route_through(cs: ChaosStack, sshd: SshServer, relay: Relay) -> None:
    """The telescope BUFFER on the sshd host, the ccat->cologne route by rsync via the relay."""
    known = Path(sshd.known_hosts_file).read_text().replace(f"]:{sshd.port} ", f"]:{relay.port} ")
    known_file = cs.stack.root / "known_hosts"
    known_file.write_text(known)
    with Session(cs.stack.engine) as s, s.begin():
        buf = s.scalar(
            select(m.DiskDataLocation)
            .join(m.Site)
            .where(m.Site.short_name == "ccat", m.DiskDataLocation.name == "buffer")
        )
        buf.host = "127.0.0.1"
        buf.ssh_user = sshd.user
        route = s.scalar(
            select(m.DataTransferRoute).where(m.DataTransferRoute.name == "ccat_to_cologne")
        )
        route.method = "rsync"
        route.options = {
            **sshd.options,
            "known_hosts_file": str(known_file),
            "ssh_options": [f"Port={relay.port}"],
            "connect_timeout": 3,
        }


def _api_token(cs: ChaosStack) -> str:
    """A filing token for the instrument (user, role and token rows, as an operator makes them)."""
    with Session(cs.stack.engine) as s, s.begin():
        role = m.Role(name="chaos-instrument", scopes=["read", "file"])
        user = m.User(username="chaos-instrument", roles=[role])
        row, raw = m.ApiToken.issue(user, "chaos", ["read", "file"])
        s.add(row)
    return raw


def _file_via_api(cs: ChaosStack, api: ApiServer, token: str, files: int, seed: int) -> int:
    """Observe: start an obs unit, write ``files`` small files at the SOURCE, file each one
    through the API; returns the number filed."""
    rng = random.Random(seed)
    st = cs.stack
    with Session(st.engine) as s:
        module = s.scalar(select(m.InstrumentModule).where(m.InstrumentModule.name == "280GHz"))
        instrument_id, module_id = module.instrument_id, module.id
    source_id = st.location_id("ccat", "primecam_raw_data")
    root = st.roots["ccat/primecam_raw_data"]
    eou_id = uuid.uuid4()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=api.base_url, headers=headers, timeout=60) as c:
        start = dt.datetime.now(dt.UTC).isoformat()
        body = {"id": str(eou_id), "start_time": start, "instrument_id": instrument_id}
        r = c.post("/api/v1/executed_obs_units/start", json=body)
        assert r.status_code == 201, r.text
        for i in range(files):
            data = rng.randbytes(rng.randint(1000, 6000))
            rel = f"api-{eou_id.hex[:8]}/scan_{i:03d}.dat"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            digest = hashlib.sha256(data).hexdigest()
            st.originals[rel] = digest.encode()
            body = {
                "id": str(uuid.uuid4()),
                "relative_path": rel,
                "size": len(data),
                "checksum": digest,
                "instrument_module_id": module_id,
                "executed_obs_unit_id": str(eou_id),
                "source_location_id": source_id,
            }
            r = c.post("/api/v1/raw_data_files", json=body)
            assert r.status_code == 201, r.text
    return files


def _transfers_out_of_ccat(cs: ChaosStack) -> list[m.DataTransfer]:
    with Session(cs.stack.engine, expire_on_commit=False) as s:
        return list(
            s.scalars(
                select(m.DataTransfer)
                .join(m.DataLocation, m.DataLocation.id == m.DataTransfer.origin_location_id)
                .join(m.Site)
                .where(m.Site.short_name == "ccat")
            )
        )


@pytest.mark.timeout(420)
def test_partition_telescope_from_cologne_waits_bounded_then_completes(
    pg_url: str,
    tmp_path: Path,
    s3_server,
    redis_server: RedisServer,
    sshd: SshServer,
) -> None:
    flush_redis(redis_server.url)
    relay = Relay(sshd.port)
    relay.heal()
    cs = chaos_stack(
        pg_url,
        tmp_path,
        s3_server,
        redis_server.url,
        CCAT_TRANSFER_MAX_RETRIES=str(MAX_RETRIES),
        CCAT_TRANSFER_RETRY_BACKOFF_S="1",
        CCAT_TRANSFER_RETRY_BACKOFF_MAX_S="4",
        CCAT_TRANSFER_PARTITION_RETRY_S=str(PARTITION_RETRY_S),
        CCAT_TRANSFER_SCHEDULED_TIMEOUT_S="60",
    )
    try:
        _route_through(cs, sshd, relay)
        cs.add_worker("ccat")
        cs.procs["worker_ccat"].env = {**cs.env, "CCAT_TRANSFER_LOCAL_HOSTS": "127.0.0.1"}
        cs.procs["worker_ccat"].stop()
        cs.procs["worker_ccat"].start()
        cs.add_worker("cologne")
        cs.add_worker("us")
        cs.add_manager()
        cs.wait_ready()
        filed = cs.file_wave(3, 10, seed=41)
        cs.wait_until(
            lambda: any(t.status == Status.COMPLETED for t in _transfers_out_of_ccat(cs)),
            120,
            "a first transfer over the link before the cut",
        )
        # --- the cut ---------------------------------------------------------------------
        relay.cut()
        cut_at = time.monotonic()
        with running_api(pg_url, tmp_path, seed=False) as api:  # the telescope keeps filing
            token = _api_token(cs)
            for k in range(3):
                filed += _file_via_api(cs, api, token, 10, seed=42 + k)
                cs.pause(CUT_S / 4)
            cs.pause(CUT_S - (time.monotonic() - cut_at))
        cut_s = time.monotonic() - cut_at
        with Session(cs.stack.engine) as s:
            # filing and packaging went on at the telescope during the cut
            built = s.scalar(
                select(func.count())
                .select_from(m.RawDataPackage)
                .where(m.RawDataPackage.status == Status.COMPLETED)
            )
            waiting = s.scalar(
                select(func.count())
                .select_from(m.DataTransfer)
                .where(m.DataTransfer.status != Status.COMPLETED)
            )
        assert built >= 6, "packaging at the telescope stopped during the cut"
        assert filed == 60
        assert waiting >= 1, "no transfer was waiting for the link"
        during = {t.id: t.failure_reason for t in _transfers_out_of_ccat(cs) if t.failure_reason}
        assert any("NetworkError" in (r or "") for r in during.values()), during
        # --- healed ----------------------------------------------------------------------
        relay.heal()
        cs.wait_until(all_archived(cs, filed), 240, "everything archived after the partition")
        figures = check_nothing_lost(cs, filed)
        with Session(cs.stack.engine) as s:
            attempts = dict(
                s.execute(
                    select(m.DataTransferLog.data_transfer_id, func.count())
                    .where(m.DataTransferLog.level == "error")
                    .group_by(m.DataTransferLog.data_transfer_id)
                ).all()
            )
    finally:
        cs.stop_all()
        cs.stack.engine.dispose()
        relay.cut()
    bound = (MAX_RETRIES + 1) * (cut_s / PARTITION_RETRY_S + 1)
    worst = max(attempts.values(), default=0)
    log_lines = len(
        re.findall(r"data_transfer \d+ failed", cs.procs["worker_cologne"].log.read_text())
    )
    revived = sum(
        int(n)
        for n in re.findall(
            r"retrying (\d+) transfers failed by an unreachable route",
            cs.procs["manager"].log.read_text(),
        )
    )
    print(
        f"\npartition {cut_s:.0f} s: {len(attempts)} transfers failed meanwhile, worst "
        f"{worst} failed attempts (bound {bound:.1f}), {log_lines} failure log lines at "
        f"Cologne, {revived} revivals after the cut; no loss: {figures}"
    )
    assert worst >= 1, "the cut never hit a transfer"
    assert worst <= bound, attempts
    assert log_lines <= sum(attempts.values()) + len(attempts), "more log lines than attempts"
