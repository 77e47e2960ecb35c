"""Schemathesis over the API's own OpenAPI document: no 5xx, and every response matches it.

Runs against the real API process and a real PostgreSQL, with an admin token (so requests get
past authentication and reach the handlers). Seeded and bounded: a fixed number of examples per
operation, derandomized, so a failure reproduces. (Schemathesis' pytest plugin does not load
under pytest 9, so the operations are driven through its Python API with Hypothesis directly.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

from .api_server import ApiServer, running_api
from .conftest import PgServer

EXAMPLES_PER_OPERATION = 15


@pytest.fixture(scope="module")
def fuzz_api(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    name = pg_server.create_database("fuzz")
    with running_api(pg_server.url(name), tmp_path_factory.mktemp("fuzz")) as server:
        yield server
    pg_server.drop_database(name)


def test_api_never_errors_and_matches_its_schema(fuzz_api: ApiServer) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_api.base_url}/openapi.json")
    headers = {"Authorization": f"Bearer {fuzz_api.tokens['admin']}"}
    checks = [not_a_server_error, response_schema_conformance, content_type_conformance]
    failures: dict[str, str] = {}
    tested = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=fuzz_api.base_url, headers=headers, checks=checks)

        try:
            run()
        except Exception as exc:  # collect every failing operation, then report them all
            failures[label] = str(exc)[:2000]
        tested += 1
    assert tested >= 10, f"only {tested} operations in the schema"
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
