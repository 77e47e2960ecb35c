"""Kill -9, a hundred times, during a pipeline run of 500 files; nothing may be lost.

Real processes on the real stack: one ``ccat-transfer worker`` per site and one
``ccat-transfer manager all`` loop, PostgreSQL, Redis, S3 archives on moto's server. A seeded
random generator (the seed is printed; ``CCAT_CHAOS_SEED`` replays a run, ``CCAT_CHAOS_KILLS``
changes the count) picks the victim and the moment of each ``kill -9`` (the whole process
group, like a crashed host) and the pause before it is started again. Data is filed in ten
waves while the killing goes on, so every stage is hit in the middle of its work.

At the end, from the database and the storage (:func:`check_nothing_lost`): every file in an
ARCHIVED package; every archive object re-hashed from the S3 bytes and every file in it
compared with the original; one archive transfer and one archive copy per package and archive;
no stray object; every SOURCE/BUFFER copy deleted only after a verified archive copy existed.
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import pytest

from tests.chaos.harness import (
    all_archived,
    chaos_stack,
    check_nothing_lost,
    flush_redis,
)
from tests.transfer.stack import RedisServer

DEFAULT_SEED = 20261123
WAVES = 10
OBS_PER_WAVE = 5
FILES_PER_OBS = 10  # 10 waves x 5 obs units x 10 files = 500 files


@pytest.mark.timeout(600)
def test_kill9_workers_and_manager_100_times_loses_nothing(
    pg_url: str, tmp_path: Path, s3_server, redis_server: RedisServer
) -> None:
    seed = int(os.environ.get("CCAT_CHAOS_SEED", DEFAULT_SEED))
    kills = int(os.environ.get("CCAT_CHAOS_KILLS", 100))
    print(f"\nkill -9 chaos: seed {seed} (CCAT_CHAOS_SEED={seed} replays it), {kills} kills")
    rng = random.Random(seed)
    flush_redis(redis_server.url)
    # every lost task costs an attempt; the kills, not the data, cause them: allow plenty
    cs = chaos_stack(pg_url, tmp_path, s3_server, redis_server.url, CCAT_TRANSFER_MAX_RETRIES="200")
    try:
        cs.start_all()
        victims = sorted(cs.procs)
        filed = 0
        waves_left = WAVES
        history: list[tuple[int, str, float]] = []
        t0 = time.monotonic()
        for k in range(kills):
            if waves_left and k % max(kills // WAVES, 1) == 0:
                filed += cs.file_wave(OBS_PER_WAVE, FILES_PER_OBS, seed=seed + waves_left)
                waves_left -= 1
            time.sleep(rng.uniform(0.2, 1.4))
            name = rng.choice(victims)
            victim = cs.procs[name]
            if victim.alive:
                victim.kill9()
                history.append((k, name, round(time.monotonic() - t0, 2)))
            time.sleep(rng.uniform(0.0, 0.6))
            victim.start()
        while waves_left:  # fewer kills than waves (CCAT_CHAOS_KILLS small)
            filed += cs.file_wave(OBS_PER_WAVE, FILES_PER_OBS, seed=seed + waves_left)
            waves_left -= 1
        kill_s = time.monotonic() - t0
        assert filed >= 500
        drain_s = cs.wait_until(all_archived(cs, filed), 300, "every file archived after kills")
        figures = check_nothing_lost(cs, filed)
    finally:
        cs.stop_all()
        cs.stack.engine.dispose()
    per_victim = {n: cs.procs[n].kills for n in victims}
    resets = sum(
        int(x)
        for x in re.findall(r"reset (\d+) stalled records", cs.procs["manager"].log.read_text())
    )
    print(f"killed {sum(per_victim.values())} times in {kill_s:.0f} s: {per_victim}")
    print(f"drained in {drain_s:.0f} s after the last kill; {resets} stalled records reset")
    print(f"no loss: {figures}")
    assert sum(per_victim.values()) == kills
    assert len(history) == kills
