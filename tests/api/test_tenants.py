"""Every endpoint answers another tenant's ids exactly like ids that do not exist."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.services import keys
from app.storage import LocalStorage
from tests.api.factories import make_adapter, make_finetune, make_generation, make_tenant

UNKNOWN_AD = "ad_" + "0" * 32

# (method, path template) for every endpoint that takes an id; {ft}, {ad}, {gen} are the owner's.
BY_ID = [
    ("GET", "/v1/finetunes/{ft}"),
    ("POST", "/v1/finetunes/{ft}/cancel"),
    ("GET", "/v1/adapters/{ad}"),
    ("GET", "/v1/adapters/{ad}/file"),
    ("DELETE", "/v1/adapters/{ad}"),
    ("GET", "/v1/generations/{gen}"),
    ("GET", "/v1/generations/{gen}/images/0"),
]


@pytest.mark.parametrize(("method", "template"), BY_ID)
def test_foreign_id_is_404_like_unknown_id(
    client: TestClient, session: Session, storage: LocalStorage, method: str, template: str
) -> None:
    owner, intruder = make_tenant(session), make_tenant(session)
    ids = {
        "ft": make_finetune(session, owner.tenant, status="queued").id,
        "ad": make_adapter(session, storage, owner.tenant).id,
        "gen": make_generation(session, storage, owner.tenant, images=1).id,
    }
    foreign = client.request(method, template.format(**ids), headers=intruder.headers)
    unknown_ids = {k: f"{k}_{'0' * 32}" for k in ids}
    unknown = client.request(method, template.format(**unknown_ids), headers=intruder.headers)
    assert foreign.status_code == unknown.status_code == 404
    assert set(foreign.json()) == {"type", "title", "status", "detail"}
    # Still there and unchanged for the owner (the DELETE and cancel did nothing).
    r = client.request("GET", template.format(**ids).removesuffix("/cancel"), headers=owner.headers)
    assert r.status_code == 200
    if "finetunes" in template:
        assert r.json()["status"] == "queued"


def test_foreign_adapter_in_generation_is_refused_like_unknown(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    owner, intruder = make_tenant(session), make_tenant(session)
    adapter = make_adapter(session, storage, owner.tenant)
    foreign = client.post(
        "/v1/generations", headers=intruder.headers, json={"prompt": "x", "adapter_id": adapter.id}
    )
    unknown = client.post(
        "/v1/generations", headers=intruder.headers, json={"prompt": "x", "adapter_id": UNKNOWN_AD}
    )
    assert foreign.status_code == unknown.status_code == 422
    assert foreign.json()["detail"].replace(adapter.id, "X") == unknown.json()["detail"].replace(
        UNKNOWN_AD, "X"
    )


def test_lists_show_only_own_objects(
    client: TestClient, session: Session, storage: LocalStorage
) -> None:
    owner, other = make_tenant(session), make_tenant(session)
    make_finetune(session, owner.tenant)
    make_adapter(session, storage, owner.tenant)
    for path in ("/v1/finetunes", "/v1/adapters"):
        assert client.get(path, headers=owner.headers).json()["count"] >= 1
        assert client.get(path, headers=other.headers).json() == {"data": [], "count": 0}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/finetunes"),
        ("POST", "/v1/finetunes"),
        ("GET", "/v1/finetunes/ft_x"),
        ("POST", "/v1/finetunes/ft_x/cancel"),
        ("GET", "/v1/adapters"),
        ("GET", "/v1/adapters/ad_x"),
        ("GET", "/v1/adapters/ad_x/file"),
        ("DELETE", "/v1/adapters/ad_x"),
        ("POST", "/v1/generations"),
        ("GET", "/v1/generations/gen_x"),
        ("GET", "/v1/generations/gen_x/images/0"),
    ],
)
def test_every_endpoint_needs_a_valid_key(
    client: TestClient, session: Session, method: str, path: str
) -> None:
    t = make_tenant(session)
    keys.revoke_key(session=session, key_id=t.key_id)
    session.commit()
    for headers in ({}, {"Authorization": "Bearer nope"}, t.headers, {"Authorization": "Basic x"}):
        r = client.request(method, path, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in r.json()["detail"] or "API key" in r.json()["detail"]


def test_health_needs_no_key(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    assert client.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}
