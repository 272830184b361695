"""Property-based run of schemathesis against the served OpenAPI: no input may cause a 5xx.

Every operation gets positive (schema-conforming) and negative (schema-violating) cases, sent
through the real app with a valid API key. Objects owned by the key's tenant exist, and some
cases use their ids, so the handlers past the 404 are exercised too. The number of cases run is
printed (run pytest with -s to see it) and asserted.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as hs
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode
from sqlalchemy.orm import Session

from app.storage import LocalStorage
from tests.api.factories import make_adapter, make_finetune, make_generation, make_tenant

pytestmark = pytest.mark.slow  # make test-slow (docs/workers.md "Service tests")

EXAMPLES = {GenerationMode.POSITIVE: 100, GenerationMode.NEGATIVE: 50}


def test_no_server_errors(client: TestClient, session: Session, storage: LocalStorage) -> None:
    t = make_tenant(session)
    ids = {
        "finetune_id": make_finetune(session, t.tenant, status="queued").id,
        "adapter_id": make_adapter(session, storage, t.tenant).id,
        "generation_id": make_generation(session, storage, t.tenant, images=1).id,
    }
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    cases = 0
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    start = time.monotonic()

    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an invalid schema fails here
        for mode, max_examples in EXAMPLES.items():
            # GenerationMode(mode): under Python 3.10's stubs (no StrEnum) the key reads as str.
            strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

            @given(case=strategy, use_real_id=hs.booleans())
            @settings(
                max_examples=max_examples,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: schemathesis.Case, use_real_id: bool) -> None:
                nonlocal cases
                cases += 1
                if use_real_id and case.path_parameters:
                    for name in case.path_parameters:
                        if name in ids:
                            case.path_parameters[name] = ids[name]
                response = case.call(headers=t.headers)
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    failures.append(f"{response.status_code} {case.as_curl_command()}")

            try:
                run()
            except Unsatisfiable:
                # No schema-violating input exists for an operation without parameters.
                assert mode is GenerationMode.NEGATIVE

    elapsed = time.monotonic() - start
    print(f"\nschemathesis: {cases} cases in {elapsed:.1f} s, statuses {dict(statuses)}")
    assert failures == [], "\n".join(failures[:20])
    assert cases >= 1000


@pytest.fixture(autouse=True)
def _quiet_errors(caplog: pytest.LogCaptureFixture) -> None:
    # The 503 paths log tracebacks on purpose; they are noise here.
    caplog.set_level("CRITICAL")
