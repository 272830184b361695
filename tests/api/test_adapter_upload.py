"""POST /v1/adapters: an adapter file made by tuneqdm_core, checked against the registered bases.

The files are written by `tuneqdm_core.save_adapter` (what `tuneqdm finetune` writes) for a
small quantized model, and the base row carries that model's real fingerprint.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load, save
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from torch import nn

from app import adapter_files
from app.models import Adapter, ServedBase
from app.settings import Settings
from app.storage import LocalStorage
from tests.api.factories import make_tenant
from tests.core.helpers import perturbed_adapter
from tuneqdm_core import AdapterConfig, QuantConfig, quantize_, save_adapter
from tuneqdm_core import serialization as core_serialization


def _model(bits: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    quantize_(model, QuantConfig(bits=bits))  # type: ignore[arg-type]
    return model


def _file(tmp_path: Path, model: nn.Module, intervals: int = 2, method: str = "tuneqdm") -> bytes:
    adapter = perturbed_adapter(model, AdapterConfig(method=method, intervals=intervals))  # type: ignore[arg-type]
    path = save_adapter(adapter, tmp_path / "a.safetensors", extra={"tokens": ["zwx"]})
    return path.read_bytes()


def _register(session: Session, name: str, model: nn.Module | None, bits: int = 4) -> None:
    fingerprint = model.tuneqdm_state.fingerprint if model is not None else None  # type: ignore[union-attr]
    session.add(
        ServedBase(
            name=name,
            source="x",
            native_resolution=64,
            prediction_type="epsilon",
            bits=bits,
            fingerprint=fingerprint,
        )
    )
    session.commit()


def _stored(session: Session, storage: LocalStorage, tenant_id: str) -> tuple[int, list[Path]]:
    session.expire_all()
    rows = session.scalar(
        select(func.count()).select_from(Adapter).where(Adapter.tenant_id == tenant_id)
    )
    folder = storage.path(f"tenants/{tenant_id}/adapters")
    return int(rows or 0), sorted(folder.glob("*")) if folder.exists() else []


def test_metadata_key_and_version_match_the_core() -> None:
    assert adapter_files.METADATA_KEY == core_serialization.METADATA_KEY
    assert adapter_files.FORMAT_VERSION == core_serialization.FORMAT_VERSION


def test_upload_then_download_and_generate_listing(
    client: TestClient, session: Session, storage: LocalStorage, tmp_path: Path
) -> None:
    model = _model()
    _register(session, "tiny", model)
    t = make_tenant(session)
    content = _file(tmp_path, model)
    r = client.post(
        "/v1/adapters",
        headers=t.headers,
        files={"file": ("mine.safetensors", content, "application/octet-stream")},
        data={"name": "from my laptop"},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["base_model"] == "tiny" and body["bits"] == 4 and body["intervals"] == 2
    assert body["method"] == "tuneqdm" and body["tokens"] == ["zwx"]
    assert body["size_bytes"] == len(content) and body["finetune_id"] is None
    assert body["name"] == "from my laptop"
    assert body["base_fingerprint"] == model.tuneqdm_state.fingerprint  # type: ignore[union-attr]
    got = client.get(body["links"]["file"], headers=t.headers)
    assert got.status_code == 200 and got.content == content
    # Counted in stored bytes: a limit just under it now refuses the same upload again.
    t.tenant.stored_bytes_limit = len(content) + 10
    session.commit()
    r = client.post(
        "/v1/adapters",
        headers=t.headers,
        files={"file": ("mine.safetensors", content, "application/octet-stream")},
    )
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "stored bytes limit" in r.json()["detail"]
    assert _stored(session, storage, t.tenant.id)[0] == 1


@pytest.mark.parametrize(
    ("registered_bits", "registered_seed", "expected"),
    [
        (4, 1, ["base fingerprint"]),
        (8, 0, ["bits 4 in the file, 8 registered"]),
    ],
)
def test_another_base_is_refused_naming_the_difference(
    client: TestClient,
    session: Session,
    storage: LocalStorage,
    tmp_path: Path,
    registered_bits: int,
    registered_seed: int,
    expected: list[str],
) -> None:
    served = _model(bits=registered_bits, seed=registered_seed)
    _register(session, "tiny", served, bits=registered_bits)
    t = make_tenant(session)
    content = _file(tmp_path, _model(bits=4, seed=0))
    r = client.post(
        "/v1/adapters",
        headers=t.headers,
        files={"file": ("a.safetensors", content, "application/octet-stream")},
    )
    assert r.status_code == 422, r.text
    problem = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    for text in expected:
        assert text in problem["detail"]
    assert "'tiny'" in problem["detail"]
    assert _stored(session, storage, t.tenant.id) == (0, [])


def _with_header(content: bytes, edit: object) -> bytes:
    (length,) = struct.unpack("<Q", content[:8])
    header = json.loads(content[8 : 8 + length])
    edit(header)  # type: ignore[operator]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + content[8 + length :]


def _meta(change: dict[str, object]) -> object:
    def edit(header: dict[str, dict[str, str]]) -> None:
        meta = json.loads(header["__metadata__"]["tuneqdm"])
        meta.update(change)
        header["__metadata__"]["tuneqdm"] = json.dumps(meta)

    return edit


def _drop_interval(content: bytes) -> bytes:
    """The file rewritten without interval 1's scales, its metadata still saying 2."""
    (length,) = struct.unpack("<Q", content[:8])
    metadata = json.loads(content[8 : 8 + length])["__metadata__"]
    tensors = {n: t for n, t in load(content).items() if not n.endswith(".1")}
    return save(tensors, metadata=metadata)


def _rename_tensor(new: str) -> object:
    def edit(header: dict[str, object]) -> None:
        old = next(n for n in header if n != "__metadata__")
        header[new] = header.pop(old)

    return edit


BAD = {
    "not safetensors": (lambda c: b"PK\x03\x04 a zip", "not a safetensors file"),
    "truncated": (lambda c: c[:-7], "do not match the file"),
    "no metadata": (lambda c: _with_header(c, lambda h: h.pop("__metadata__")), "no 'tuneqdm'"),
    "method full": (lambda c: _with_header(c, _meta({"method": "full"})), "method 'full'"),
    "bits 3": (lambda c: _with_header(c, _meta({"bits": 3})), "bits 3"),
    "version": (lambda c: _with_header(c, _meta({"format_version": 9})), "version 9"),
    "intervals lie": (lambda c: _with_header(c, _meta({"intervals": 3})), "3 interval(s)"),
    "interval missing": (_drop_interval, "2 interval(s)"),
    "huge value": (lambda c: _with_header(c, _meta({"method": "m" * 100_000})), "method 'mmm"),
    "huge name": (lambda c: _with_header(c, _rename_tensor("t" * 100_000)), "unexpected"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_get_422_naming_the_fault(
    client: TestClient, session: Session, storage: LocalStorage, tmp_path: Path, case: str
) -> None:
    model = _model()
    _register(session, "tiny", model)
    t = make_tenant(session)
    change, expected = BAD[case]
    content = change(_file(tmp_path, model))
    r = client.post(
        "/v1/adapters",
        headers=t.headers,
        files={"file": ("a.safetensors", content, "application/octet-stream")},
    )
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert expected in detail, detail
    assert len(detail) < 600  # what the file says is cut short, never echoed whole
    assert _stored(session, storage, t.tenant.id) == (0, [])


def test_size_limit_is_413(
    client: TestClient,
    session: Session,
    storage: LocalStorage,
    settings: Settings,
    tmp_path: Path,
) -> None:
    model = _model()
    _register(session, "tiny", model)
    t = make_tenant(session)
    content = _file(tmp_path, model)
    settings.max_adapter_bytes = len(content) - 1
    r = client.post(
        "/v1/adapters",
        headers=t.headers,
        files={"file": ("a.safetensors", content, "application/octet-stream")},
    )
    assert r.status_code == 413, r.text
    assert "TUNEQDM_MAX_ADAPTER_BYTES" in r.json()["detail"]
    assert _stored(session, storage, t.tenant.id) == (0, [])


def test_named_base_that_differs_and_unknown_base(
    client: TestClient, session: Session, tmp_path: Path
) -> None:
    model = _model()
    _register(session, "tiny", model)
    _register(session, "other", _model(seed=3))
    t = make_tenant(session)
    content = _file(tmp_path, model)

    def post(base: str) -> dict[str, object]:
        r = client.post(
            "/v1/adapters",
            headers=t.headers,
            files={"file": ("a.safetensors", content, "application/octet-stream")},
            data={"base": base},
        )
        assert r.status_code in (201, 422), r.text
        return dict(r.json())

    assert "base 'other'" in str(post("other")["detail"])
    assert "not registered" in str(post("nope")["detail"])
    assert post("tiny")["base_model"] == "tiny"


def test_the_client_uploads_and_downloads(
    client: TestClient, session: Session, tmp_path: Path
) -> None:
    import threading

    import uvicorn

    from tests.service.procs import free_port
    from tuneqdm_client import Client

    model = _model()
    _register(session, "tiny", model)
    t = make_tenant(session)
    source = tmp_path / "mine.safetensors"
    source.write_bytes(_file(tmp_path, model))
    # The test's app served over real HTTP, for the client's multipart upload.
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(client.app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.05)
        with Client(f"http://127.0.0.1:{port}", t.key) as api:
            adapter = api.upload_adapter(source, name="mine")
            assert adapter["name"] == "mine" and adapter["base_model"] == "tiny"
            back = api.download_adapter(adapter["id"], tmp_path / "back.safetensors")
        assert back.read_bytes() == source.read_bytes()
    finally:
        server.should_exit = True
        thread.join(10)
