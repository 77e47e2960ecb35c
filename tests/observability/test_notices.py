"""Operator notices in the observed run: the real ``manager all`` process posts the notice of
the failed raw data package to a real webhook receiver (conftest.py), once, and records it."""

from __future__ import annotations

import json

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from tests.observability.conftest import ObservedStack


def test_the_failed_package_reaches_the_webhook_once_with_its_reason(
    observed: ObservedStack,
) -> None:
    assert observed.webhook_dir is not None and observed.failed_package
    bodies = [json.loads(p.read_bytes()) for p in sorted(observed.webhook_dir.glob("*.json"))]
    items = [i for body in bodies for i in body["notices"]]
    assert items, f"no digest posted; manager log:\n{observed.logs['manager'].read_text()[-3000:]}"
    about = [i for i in items if observed.failed_package in i["summary"]]
    assert len(about) == 1, items  # told once, though the manager ran many passes
    (item,) = about
    assert item["kind"] == "failed" and item["state"] == "new" and item["site"] == "ccat"
    assert item["summary"].startswith(f"raw data package {observed.failed_package} at ccat/")
    assert "(log: " in item["detail"], item
    assert item["detail"] in bodies[0]["text"]
    with Session(observed.stack.engine) as s:
        notices = s.scalars(select(m.OperatorNotice).where(m.OperatorNotice.kind == "failed")).all()
    assert [set(n.delivered) for n in notices] == [{"webhook"}]
    assert notices[0].cleared_at is None
