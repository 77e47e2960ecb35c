"""Stack benchmark: the compose stack's cold start to "every service healthy" and the idle
memory of every service, beside baselines measured in the same run.

Cold start: ``up -d`` of the whole stack (compose/docker-compose.yml) on fresh volumes with the
images already built, until every long-running service is healthy and the one-shots (migrate +
seed, create-buckets) exited 0; each service's own time is printed too. Idle memory: after
``--idle-s`` seconds with nothing to do, the mean of ``--samples`` readings of ``docker stats``
(cgroup memory without the page cache) per running container. Targets (docs/compose.md): cold
start < 60 s, idle memory of all services < 1.5 GB.

Baselines from the same run: the time ``docker run --rm <ccat image> true`` takes (the floor
of starting any container here) and the memory of an idle ``python3`` in the CCAT image (the
floor of any Python service).

Missing images are built first with scripts/build-images.sh (not timed). Exits 0 when a target
is missed (it is a measurement) and 1 when the stack does not come up.

    .venv/bin/python bench/stack_bench.py [--idle-s 20] [--samples 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "compose"))

from stackctl import ONE_SHOTS, Stack, StackError, log, missing_images, parse_size  # noqa: E402

COLD_START_TARGET_S = 60.0
MEMORY_TARGET_BYTES = 1.5e9
MiB = 1024**2


def baseline_start_s(image: str, runs: int = 3) -> float:
    """Fastest ``docker run --rm IMAGE true`` of a few."""
    best = float("inf")
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "true", image],
            check=True,
            capture_output=True,
        )
        best = min(best, time.monotonic() - t0)
    return best


def baseline_python_memory(image: str) -> int:
    """Memory of an idle python3 in the CCAT image."""
    cid = subprocess.run(
        [
            "docker",
            "run",
            "-d",
            "--rm",
            "--entrypoint",
            "python3",
            image,
            "-c",
            "import time; time.sleep(120)",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        time.sleep(2)
        out = subprocess.run(
            ["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", cid],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return parse_size(out.split("/")[0].strip())
    finally:
        subprocess.run(["docker", "kill", cid], capture_output=True, check=False)


def cold_start(stack: Stack, timeout: float = 300) -> tuple[float, dict[str, float]]:
    """``up -d`` until all healthy; returns the total and each service's time."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        stack.argv("up", "-d"),
        env=stack.env,
        cwd=REPO / "compose",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready: dict[str, float] = {}
    while True:
        now = time.monotonic() - t0
        cs = stack.containers()
        for c in cs:
            if c.service in ready:
                continue
            if c.service in ONE_SHOTS and c.status == "exited":
                if c.exit_code:
                    raise StackError(f"{c.service} exited {c.exit_code}\n{stack.logs(c.service)}")
                ready[c.service] = now
            elif c.health == "healthy":
                ready[c.service] = now
            elif c.health == "unhealthy" or (c.status == "exited" and c.service not in ONE_SHOTS):
                raise StackError(f"{c.service} is {c.health or c.status}\n{stack.logs(c.service)}")
        if proc.poll() is not None and proc.returncode != 0:
            raise StackError(f"up failed: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
        if cs and proc.poll() is not None and len(ready) == len({c.service for c in cs}):
            return time.monotonic() - t0, ready
        if now > timeout:
            missing = sorted({c.service for c in cs} - set(ready))
            raise StackError(f"not healthy after {timeout:.0f} s: {missing}")
        time.sleep(0.25)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--idle-s", type=float, default=20.0, help="idle time before measuring memory")
    p.add_argument("--samples", type=int, default=3, help="docker stats readings to average")
    args = p.parse_args(argv)
    console = Console(width=120)
    stack = Stack(project=f"ccatbench{int(time.time()) % 100000}")
    image = stack.env.get("CCAT_IMAGE", "ccat-data-center:0.1.0")
    try:
        missing = missing_images(stack)
        if missing:
            log(f"building missing images {missing} (not timed)")
            subprocess.run(
                ["bash", str(REPO / "scripts" / "build-images.sh")], check=True, cwd=REPO
            )
        log("baselines: container start, idle python3")
        start_floor = baseline_start_s(image)
        python_floor = baseline_python_memory(image)
        log("cold start: up -d on fresh volumes")
        total_s, ready = cold_start(stack)
        log(f"all healthy after {total_s:.1f} s; idle for {args.idle_s:g} s")
        time.sleep(args.idle_s)
        samples: dict[str, list[tuple[int, float]]] = {}
        for _ in range(args.samples):
            for svc, reading in stack.stats().items():
                samples.setdefault(svc, []).append(reading)
            time.sleep(1)
    except (StackError, subprocess.CalledProcessError) as exc:
        print(f"stack_bench: the stack did not come up: {exc}", file=sys.stderr)
        stack.down()
        return 1
    stack.down()

    mem = {svc: int(statistics.mean(m for m, _ in v)) for svc, v in samples.items()}
    cpu = {svc: statistics.mean(c for _, c in v) for svc, v in samples.items()}
    total_mem = sum(mem.values())
    table = Table(title="Compose stack: cold start and idle memory")
    for col in ("service", "ready at (s)", "idle memory (MiB)", "x idle python3", "idle CPU %"):
        table.add_column(col, justify="left" if col == "service" else "right")
    for svc in sorted(ready, key=lambda s: ready[s]):
        m = mem.get(svc)
        table.add_row(
            svc + (" (one-shot)" if svc in ONE_SHOTS else ""),
            f"{ready[svc]:.1f}",
            f"{m / MiB:.0f}" if m is not None else "-",
            f"{m / python_floor:.1f}" if m is not None and python_floor else "-",
            f"{cpu[svc]:.1f}" if svc in cpu else "-",
        )
    table.add_section()
    table.add_row("baseline: docker run --rm <image> true", f"{start_floor:.1f}", "", "", "")
    table.add_row("baseline: idle python3 in the image", "", f"{python_floor / MiB:.0f}", "1.0", "")
    table.add_section()
    cold_ok = total_s < COLD_START_TARGET_S
    mem_ok = total_mem < MEMORY_TARGET_BYTES
    table.add_row(
        "cold start to all healthy",
        f"{total_s:.1f}",
        "",
        f"target < {COLD_START_TARGET_S:.0f} s: {'met' if cold_ok else 'MISSED'}",
        "",
    )
    table.add_row(
        f"idle memory, {len(mem)} services",
        "",
        f"{total_mem / MiB:.0f} ({total_mem / 1e9:.2f} GB)",
        f"target < 1.5 GB: {'met' if mem_ok else 'MISSED'}",
        f"{sum(cpu.values()):.1f}",
    )
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
