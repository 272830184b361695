"""Photos as https URLs (`image_urls`): fetched from a real local HTTPS server (its test CA
trusted through SSL_CERT_FILE), checked like uploads; a bad URL is a 4xx naming it, with
nothing stored; private addresses (127.0.0.1 here) only with TUNEQDM_ALLOW_PRIVATE_WEBHOOKS."""

from __future__ import annotations

import ipaddress
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.errors import InvalidInput
from app.image_urls import fetch_all
from app.models import FinetuneJob
from app.storage import LocalStorage
from app.webhooks import is_forbidden_address
from tests.api.factories import image_bytes, make_tenant, snapshot
from tests.api.test_bad_input import assert_problem

PNG = image_bytes(64, 64)
JPEG = image_bytes(48, 64, "JPEG", color="blue")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA and a server certificate for 127.0.0.1 and 127.0.0.2 signed by it."""
    d = tmp_path_factory.mktemp("tls")
    (d / "ext.cnf").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,IP:127.0.0.2\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=tuneqdm test CA"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        cwd=d,
    )
    _openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key"),
        *("-out", "server.csr", "-subj", "/CN=127.0.0.1"),
        cwd=d,
    )
    _openssl(
        *("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key"),
        *("-CAcreateserial", "-days", "2", "-out", "server.pem", "-extfile", "ext.cnf"),
        cwd=d,
    )
    return d


class _Photos(BaseHTTPRequestHandler):
    """/a.png, /b.jpg, /text, /big, /missing, and redirects: /to-b (same host), /to-other
    (127.0.0.2), /to-http (plain http), /loop (forever)."""

    def do_GET(self) -> None:
        port = self.connection.getsockname()[1]
        redirects = {
            "/to-b": "/b.jpg",
            "/to-other": f"https://127.0.0.2:{port}/a.png",
            "/to-http": f"http://127.0.0.1:{port}/a.png",
            "/loop": "/loop",
        }
        bodies = {"/a.png": PNG, "/b.jpg": JPEG, "/text": b"<html>not a photo</html>"}
        if self.path in redirects:
            self.send_response(302)
            self.send_header("Location", redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/big":
            # No Content-Length: the limit must hold while reading, not only from the header.
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"\x89PNG" + b"\x00" * 300 * 1024)
        elif self.path in bodies:
            self.send_response(200)
            self.send_header("Content-Length", str(len(bodies[self.path])))
            self.end_headers()
            self.wfile.write(bodies[self.path])
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server(certs: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The base URL of an HTTPS server on 127.0.0.0/8 whose CA the fetcher trusts."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certs / "ca.pem"))
    httpd = ThreadingHTTPServer(("0.0.0.0", 0), _Photos)
    httpd.daemon_threads = True
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def private_ok(client: TestClient) -> None:
    settings = client.app.state.settings  # type: ignore[attr-defined]
    settings.allow_private_webhooks = True
    settings.webhook_ports = []


def _post(client: TestClient, headers: dict[str, str], urls: list[str], files: int = 0):  # type: ignore[no-untyped-def]
    parts = [("images", (f"{i}.png", PNG, "image/png")) for i in range(files)]
    return client.post(
        "/v1/finetunes",
        headers=headers,
        files=parts or None,
        data={"instance_prompt": "a photo of sks dog", "image_urls": urls},
    )


def test_photos_from_urls_make_a_job_with_the_uploads(
    client: TestClient, session: Session, server: str, private_ok: None
) -> None:
    t = make_tenant(session)
    r = _post(client, t.headers, [f"{server}/a.png", f"{server}/to-b"], files=1)
    assert r.status_code == 202, r.text
    job = session.get(FinetuneJob, r.json()["id"])
    assert job is not None and job.num_images == 3
    # Uploaded photos first, then the URLs in their order (b.jpg is 48x64: portrait).
    assert [(i.width, i.height) for i in job.images] == [(64, 64), (64, 64), (48, 64)]


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/text", 422, "not a readable PNG, JPEG or WebP image"),
        ("/big", 413, "larger than the limit"),
        ("/missing", 422, "answered HTTP 404"),
        ("/to-http", 422, "redirects to a URL that is refused"),
        ("/loop", 422, "redirects more than"),
    ],
)
def test_a_bad_url_is_refused_by_name_and_nothing_is_stored(
    client: TestClient,
    session: Session,
    storage: LocalStorage,
    server: str,
    private_ok: None,
    path: str,
    status: int,
    says: str,
) -> None:
    t = make_tenant(session)
    before = snapshot(session, storage)
    url = f"{server}{path}"
    r = _post(client, t.headers, [f"{server}/a.png", url])
    assert r.status_code == status, r.text
    assert_problem(r, status)
    assert f"image_urls[1] ({url})" in r.json()["detail"] and says in r.json()["detail"]
    assert snapshot(session, storage) == before


def test_only_https_urls_are_accepted(client: TestClient, session: Session) -> None:
    t = make_tenant(session)
    url = "http://photos.example.com/a.png"
    r = _post(client, t.headers, [url])
    assert_problem(r, 422)
    body = r.json()
    assert url in body["detail"] and "https" in body["detail"]
    assert body["errors"] == [{"field": "image_urls[0]", "message": body["detail"]}]


def test_a_private_address_is_refused_unless_allowed(
    client: TestClient, session: Session, storage: LocalStorage, server: str
) -> None:
    client.app.state.settings.webhook_ports = []  # type: ignore[attr-defined]
    t = make_tenant(session)
    before = snapshot(session, storage)
    url = f"{server}/a.png"
    r = _post(client, t.headers, [url])
    assert_problem(r, 422)
    assert url in r.json()["detail"] and "private" in r.json()["detail"]
    assert snapshot(session, storage) == before
    client.app.state.settings.allow_private_webhooks = True  # type: ignore[attr-defined]
    assert _post(client, t.headers, [url]).status_code == 202


def test_urls_count_towards_the_photo_limit(
    client: TestClient, session: Session, server: str, private_ok: None
) -> None:
    t = make_tenant(session)  # max_images is 4 in the API tests
    r = _post(client, t.headers, [f"{server}/a.png"] * 2, files=3)
    assert_problem(r, 422)
    assert "5 images sent, the limit is 4" in r.json()["detail"]


def test_every_redirect_hop_is_checked_again(server: str) -> None:
    """127.0.0.1 stands for the public internet here; 127.0.0.2 (also this server) for a
    private network the redirect points into."""

    def public(ip: Any) -> bool:
        return ip == ipaddress.ip_address("127.0.0.1") or not is_forbidden_address(ip)

    args: dict[str, Any] = {"limit": 1 << 20, "timeout_s": 10, "allow_private": False, "ports": []}
    assert fetch_all([f"{server}/a.png"], allowed=public, **args) == [PNG]
    with pytest.raises(InvalidInput, match=r"127\.0\.0\.2.*public hosts only"):
        fetch_all([f"{server}/to-other"], allowed=public, **args)
    # The same redirect, every address allowed: followed.
    assert fetch_all([f"{server}/to-other"], allowed=lambda ip: True, **args) == [PNG]


def test_the_client_sends_image_urls_and_webhook_events(
    client: TestClient, session: Session, server: str, private_ok: None, tmp_path: Path
) -> None:
    import uvicorn

    from tests.service.procs import free_port
    from tuneqdm_client import Client

    t = make_tenant(session)
    photo = tmp_path / "c.png"
    photo.write_bytes(PNG)
    # The test's app served over real HTTP, for the client's multipart form.
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(client.app, port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        while not uv.started:
            thread.join(0.05)
        with Client(f"http://127.0.0.1:{port}", t.key) as api:
            job = api.create_finetune(
                [photo],
                "a photo of sks dog",
                image_urls=[f"{server}/a.png", f"{server}/b.jpg"],
                webhook_url="https://hooks.example.com/tuneqdm",
                webhook_events=["progress", "succeeded"],
            )
    finally:
        uv.should_exit = True
        thread.join(10)
    assert job["num_images"] == 3
    assert job["webhook_events"] == ["progress", "succeeded"]
