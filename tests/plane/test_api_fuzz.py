"""A fuzzing run of the control plane API against its own OpenAPI document (schemathesis):
random valid and invalid requests to every operation (random names, the names of a tenant and
volume that exist, and input that breaks the schema), with an operator token, must never get a
5xx, and every answer must match the document (status codes, content types, bodies).

The server is a real Plane on the embedded default backends: creating a volume creates one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from loftfs.plane.api import create_app
from loftfs.plane.config import load_config
from loftfs.plane.server import Plane, bootstrap_token

EXAMPLES = 20  # per operation and mode
KNOWN = {"tenant": "acme", "volume": "vol1"}  # created by the fixture
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzz_target(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[schemathesis.BaseSchema, str]]:
    root = tmp_path_factory.mktemp("plane-fuzz")
    config = load_config(None, {"state_dir": str(root), "delete_grace": "1h", "usage_interval": 0})
    plane = Plane(config)
    plane.start(worker=False)
    token = bootstrap_token(config, "fuzz")
    app = create_app(plane)
    # a tenant and a volume exist, so that routes naming them get past the 404s too
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        h = {"Authorization": f"Bearer {token}"}
        assert c.post("/v1/tenants", json={"name": "acme"}, headers=h).status_code == 201
        r = c.post("/v1/tenants/acme/volumes", json={"name": "vol1"}, headers=h)
        assert r.status_code == 201, r.text
    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", app), token
    finally:
        plane.close()


def test_api_conforms_to_its_document(
    fuzz_target: tuple[schemathesis.BaseSchema, str],
) -> None:
    api_schema, token = fuzz_target
    headers = {"Authorization": f"Bearer {token}"}
    failures: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20

    strategies = []
    for operation in operations:
        pinned = {k: v for k, v in KNOWN.items() if "{" + k + "}" in operation.path}
        strategies.append((operation, "random names", operation.as_strategy()))
        if pinned:
            strategies.append(
                (operation, "existing names", operation.as_strategy(path_parameters=pinned))
            )
        strategies.append(
            (operation, "invalid input", operation.as_strategy(GenerationMode.NEGATIVE))
        )

    for operation, mode, strategy in strategies:

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            run()
        except Unsatisfiable:
            assert mode == "invalid input"  # nothing to break: the operation takes no input
        except Exception as e:
            failures.append(f"{operation.label} ({mode}): {str(e)[:2000]}")
    assert not failures, "\n\n".join(failures)
