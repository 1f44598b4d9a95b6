"""The server's OpenAPI document matches what it does: schemathesis against a real uvicorn.

Every operation gets generated requests (valid and invalid parameters, odd cursors, ranges
of strings) with an admin token, and every response must be documented: its status code,
its content type, its headers and its body's schema. None may be a server error. The
generated requests may remove crashes or change groups: the server serves a copy of the
checked-in crashes of its own.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from tests.conftest import FixtureVault
from tests.test_server import TOKENS, serve


def test_every_operation_answers_as_documented(fixture_vault_copy: FixtureVault) -> None:
    with serve(fixture_vault_copy) as served:
        _check_every_operation(served.url)


def _check_every_operation(url: str) -> None:
    schema = schemathesis.openapi.from_url(url + "/api/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "GET /api/v1/crashes", "GET /api/v1/crashes/{crash_id}", "GET /api/v1/crashes/{crash_id}/core",
        "GET /api/v1/crashes/{crash_id}/report", "DELETE /api/v1/crashes/{crash_id}", "GET /api/v1/groups",
        "GET /api/v1/namespaces", "GET /buildid/{build_id}/executable", "GET /buildid/{build_id}/debuginfo",
    }  # fmt: skip
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            # A page cursor is opaque: no schema can tell a made-up one (a 400) from one the server gave.
            made_up_cursor = "cursor" in (case.query or {})
            case.call_and_validate(
                headers={"Authorization": f"Bearer {TOKENS['admin']}"},
                excluded_checks=[positive_data_acceptance] if made_up_cursor else [],
            )

        check()
