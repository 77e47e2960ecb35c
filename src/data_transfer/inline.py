"""Run the pipeline in one process without a broker: the same managers and operations.

Used by ``ccat-transfer run-once --inline``, the property tests and the data-plane benchmark.
Tasks are queued in memory and executed in submission order (or in any order the caller
chooses, see :meth:`QueueDispatcher.drain`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .managers import MANAGERS, PassReport, run_pass
from .operations import OPERATIONS, Context, Outcome


@dataclass
class Submitted:
    """One task waiting in memory."""

    kind: str
    payload: Any
    queue: str


@dataclass
class QueueDispatcher:
    """Collects submitted tasks; :meth:`drain` runs them."""

    pending: list[Submitted] = field(default_factory=list)
    log: list[tuple[Submitted, Outcome]] = field(default_factory=list)

    def submit(self, kind: str, payload: Any, queue: str) -> None:
        """Queue a task in memory."""
        self.pending.append(Submitted(kind, payload, queue))

    def drain(
        self,
        ctx: Context,
        *,
        rng: random.Random | None = None,
        hook: Callable[[Submitted], bool] | None = None,
    ) -> list[Outcome]:
        """Run every queued task (shuffled when ``rng`` is given). ``hook`` may return False
        to drop a task, simulating a lost message or a worker killed before it started."""
        todo, self.pending = self.pending, []
        if rng is not None:
            rng.shuffle(todo)
        out = []
        for task in todo:
            if hook is not None and not hook(task):
                continue
            outcome = OPERATIONS[task.kind](ctx, task.payload)
            self.log.append((task, outcome))
            out.append(outcome)
        return out


def run_all_once(ctx: Context, dispatcher: QueueDispatcher | None = None) -> list[PassReport]:
    """Every manager one pass in pipeline order, running each manager's tasks right away."""
    dispatcher = dispatcher or QueueDispatcher()
    reports = []
    for name in MANAGERS:
        reports.append(run_pass(name, ctx.engine, ctx.settings, dispatcher, ctx.heartbeats))
        dispatcher.drain(ctx)
    return reports
