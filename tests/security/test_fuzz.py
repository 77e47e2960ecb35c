"""Schemathesis over the whole OpenAPI document: at least 1,000 generated requests against the
real API process and a real PostgreSQL, with an admin token (so they reach the handlers), and
not one 5xx. Derandomized: a failure reproduces on the next run.

(Schemathesis' pytest plugin does not load under pytest 9: the operations are driven through
its Python API and Hypothesis directly, as in tests/test_api_fuzz.py.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from ..api_server import ApiServer, running_api
from ..conftest import PgServer

MIN_CASES = 1_000
EXAMPLES_PER_OPERATION = 25


@pytest.fixture(scope="module")
def fuzz_api(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    name = pg_server.create_database("secfuzz")
    with running_api(pg_server.url(name), tmp_path_factory.mktemp("secfuzz")) as server:
        yield server
    pg_server.drop_database(name)


def test_a_thousand_generated_requests_and_no_server_error(fuzz_api: ApiServer) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_api.base_url}/openapi.json")
    headers = {"Authorization": f"Bearer {fuzz_api.tokens['admin']}"}
    failures: dict[str, str] = {}
    cases = 0
    statuses: dict[int, int] = {}
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        operations += 1

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def run(case: schemathesis.Case) -> None:
            nonlocal cases
            cases += 1
            response = case.call(base_url=fuzz_api.base_url, headers=headers, timeout=60)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            case.validate_response(response, checks=[not_a_server_error])

        try:
            run()
        except Exception as exc:  # collect every failing operation, then report them all
            failures[label] = str(exc)[:2000]
    print(f"schemathesis: {cases} cases over {operations} operations; statuses {statuses}")
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert cases >= MIN_CASES, f"only {cases} generated requests (need {MIN_CASES})"
    assert not any(code >= 500 for code in statuses)
