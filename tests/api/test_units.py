"""Unit tests of the FastAPI-free pieces: storage keys, webhook checks, settings, body limit."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from app.errors import InvalidInput
from app.limits import BodySizeLimit
from app.settings import Settings
from app.storage import InvalidKey, LocalStorage, adapter_key, finetune_input_key
from app.webhooks import check_webhook_url, is_forbidden_address


@pytest.mark.parametrize(
    "key",
    [
        "../etc/passwd",
        "/etc/passwd",
        "tenants/../../x",
        "tenants/a/..",
        "tenants\\a",
        "tenants//a",
        "Tenants/A.png",
        "a/b.png/c",
        "",
        "tenants/a b",
    ],
)
def test_storage_refuses_keys_that_are_not_server_made(tmp_path: Path, key: str) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(InvalidKey):
        storage.put(key, b"x")
    assert list(tmp_path.iterdir()) == []


def test_storage_layout_and_cleanup(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    key = finetune_input_key("tn_1", "ft_2", 3)
    assert key == "tenants/tn_1/finetunes/ft_2/inputs/003.jpg"
    assert adapter_key("tn_1", "ad_9") == "tenants/tn_1/adapters/ad_9.safetensors"
    storage.put(key, b"png")
    assert storage.exists(key) and storage.open(key).read() == b"png"
    storage.delete(key)
    assert not storage.exists(key)
    assert list(tmp_path.iterdir()) == []  # empty folders are removed too


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/x",
        "http://8.8.8.8:8080/hook?a=1",
        "https://[2606:4700::1111]/",
        "http://example.com.",
    ],
)
def test_public_webhooks_pass(url: str) -> None:
    assert check_webhook_url(url, allow_private=False, ports=[80, 443, 8080]) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://100.64.0.1/",  # carrier-grade NAT
        "http://172.16.5.4/",
        "http://[fe80::1]/",
        "http://[fd00::1]/",
        "http://0x7f.0.0.1/",
        "http://printer.local/",
        "http://api.internal/",
        "http://LOCALHOST./",
        "http://224.0.0.1/",
        "javascript:alert(1)",
        "file:///etc/passwd",
        "gopher://a.org/",
    ],
)
def test_dangerous_webhooks_refused(url: str) -> None:
    with pytest.raises(InvalidInput):
        check_webhook_url(url, allow_private=False, ports=[80, 443])


@pytest.mark.parametrize(
    "url",
    [
        # IPv6 forms that carry a private IPv4 address, and deprecated local ranges.
        "http://[64:ff9b::a00:1]/",  # NAT64 of 10.0.0.1
        "http://[64:ff9b::7f00:1]/",  # NAT64 of 127.0.0.1
        "http://[64:ff9b:1::808:808]/",  # local-use NAT64 (RFC 8215)
        "http://[2002:7f00:1::1]/",  # 6to4 of 127.0.0.1
        "http://[2002:c0a8:101::1]/",  # 6to4 of 192.168.1.1
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",  # Teredo
        "http://[::7f00:1]/",  # IPv4-compatible 127.0.0.1
        "http://[::a9fe:a9fe]/",  # IPv4-compatible 169.254.169.254
        "http://[::ffff:127.0.0.1]/",  # IPv4-mapped
        "http://[::ffff:a00:1]/",  # IPv4-mapped 10.0.0.1, hex form
        "http://[fec0::1]/",  # site-local
        "http://[fed0::1]/",  # site-local
    ],
)
def test_private_addresses_in_ipv6_forms_refused(url: str) -> None:
    with pytest.raises(InvalidInput, match="loopback, private"):
        check_webhook_url(url, allow_private=False, ports=[80, 443])


@pytest.mark.parametrize(
    "address",
    ["64:ff9b::808:808", "2002:808:808::1", "2606:4700::1111", "8.8.8.8"],
)
def test_public_addresses_in_embedded_forms_pass(address: str) -> None:
    # The same forms around a public IPv4 address are ordinary public addresses.
    assert not is_forbidden_address(ipaddress.ip_address(address))


def test_webhook_ports_are_limited_unless_configured() -> None:
    for url in ("http://8.8.8.8:8080/", "https://hooks.example.com:22/", "http://a.org:6379/"):
        with pytest.raises(InvalidInput, match="TUNEQDM_WEBHOOK_PORTS"):
            check_webhook_url(url, allow_private=False, ports=[80, 443])
    # Explicit default ports and the scheme's own port pass; private hosts get no port pass.
    for url in ("http://a.org:80/", "https://a.org:443/", "https://a.org/", "http://a.org/"):
        assert check_webhook_url(url, allow_private=False, ports=[80, 443]) == url
    with pytest.raises(InvalidInput, match="port 8080"):
        check_webhook_url("http://127.0.0.1:8080/", allow_private=True, ports=[80, 443])
    assert check_webhook_url("http://8.8.8.8:8080/", allow_private=False, ports=[8080])
    assert check_webhook_url("http://8.8.8.8:8080/", allow_private=False, ports=[])
    with pytest.raises(ValidationError, match="WEBHOOK_PORTS"):
        Settings(webhook_ports=[0])


def test_production_refuses_development_defaults() -> None:
    with pytest.raises(ValidationError, match="TUNEQDM_DATABASE_URL"):
        Settings(env="production")
    with pytest.raises(ValidationError, match="ALLOW_PRIVATE_WEBHOOKS"):
        Settings(
            env="production",
            database_url="postgresql+psycopg://db/tuneqdm",
            broker_url="redis://redis:6379/0",
            allow_private_webhooks=True,
        )
    with pytest.raises(ValidationError, match="TUNEQDM_SECRET_KEY"):
        Settings(
            env="production",
            database_url="postgresql+psycopg://db/tuneqdm",
            broker_url="redis://redis:6379/0",
        )
    ok = Settings(
        env="production",
        database_url="postgresql+psycopg://db/tuneqdm",
        broker_url="redis://redis:6379/0",
        secret_key="x" * 32,
    )
    assert ok.resolved_broker_url == "redis://redis:6379/0"


def test_stale_lease_must_outlive_two_heartbeats() -> None:
    with pytest.raises(ValidationError, match="STALE_AFTER_S"):
        Settings(heartbeat_s=5, stale_after_s=8)
    assert Settings(heartbeat_s=5, stale_after_s=10).stale_after_s == 10


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TUNEQDM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TUNEQDM_MAX_IMAGES", "7")
    monkeypatch.setenv("TUNEQDM_REQUIRE_IDENTIFIER_TOKEN", "false")
    s = Settings()
    assert s.max_images == 7 and s.require_identifier_token is False
    assert s.resolved_database_url == f"sqlite:///{tmp_path.resolve()}/tuneqdm.sqlite"
    assert s.resolved_storage_dir == tmp_path.resolve() / "files"


def test_body_limit_stops_a_chunked_upload_without_content_length() -> None:
    inner = FastAPI()

    @inner.post("/")
    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(len(await request.body())))

    client = TestClient(BodySizeLimit(inner, max_bytes=1000))

    def chunks(n: int):  # type: ignore[no-untyped-def]
        for _ in range(n):
            yield b"x" * 100

    assert client.post("/", content=chunks(5)).text == "500"
    r = client.post("/", content=chunks(50))
    assert r.status_code == 413 and "larger than 1000 bytes" in r.json()["detail"]


def test_database_down_is_503_json(tmp_path: Path) -> None:
    from app.main import create_app

    settings = Settings(
        data_dir=tmp_path,
        database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
        broker_url="memory://",
    )
    client = TestClient(create_app(settings), raise_server_exceptions=False)
    r = client.get("/v1/adapters", headers={"Authorization": "Bearer tqk_x"})
    assert r.status_code == 503 and "database is not reachable" in r.json()["detail"]
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("unreach")
    assert client.get("/healthz").status_code == 200


def test_unexpected_errors_keep_the_problem_shape(tmp_path: Path) -> None:
    from app.main import create_app

    app = create_app(Settings(data_dir=tmp_path, broker_url="memory://"))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("bug")

    r = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert r.status_code == 500 and r.json() == {
        "type": "urn:tuneqdm:problem:internal",
        "title": "Internal Server Error",
        "status": 500,
        "detail": "internal error; it has been logged",
    }
