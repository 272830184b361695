"""The storage contract, one test body for both backends: a local directory and a real
S3-compatible store (SeaweedFS, tests/s3server.py)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.s3_storage import MULTIPART_BYTES, S3Storage
from app.storage import (
    DamagedObject,
    InvalidKey,
    LocalStorage,
    Storage,
    storage_from_settings,
)
from tests.s3server import S3Server

KEY = "tenants/t_1/generations/gen_1/a1/000.png"


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        yield LocalStorage(tmp_path / "files")
        return
    server: S3Server = request.getfixturevalue("s3_server")
    s3 = S3Storage(
        bucket=server.bucket,
        endpoint_url=server.endpoint_url,
        access_key_id=server.access_key_id,
        secret_access_key=server.secret_access_key,
        region=server.region,
    )
    yield s3
    s3.delete_prefix("tenants")  # the session's bucket is empty for the next test


def test_put_open_exists_size_delete(storage: Storage) -> None:
    assert not storage.exists(KEY)
    storage.put(KEY, b"png bytes")
    assert storage.exists(KEY) and storage.size(KEY) == 9
    with storage.open(KEY) as f:
        assert f.read() == b"png bytes"
    storage.put(KEY, b"replaced")  # a put replaces the whole object
    with storage.open(KEY) as f:
        assert f.read() == b"replaced"
    storage.delete(KEY)
    assert not storage.exists(KEY)
    storage.delete(KEY)  # deleting what is gone is no error
    for read in (storage.open, storage.size):
        with pytest.raises(FileNotFoundError):
            read(KEY)


def test_list_and_delete_prefix(storage: Storage) -> None:
    keys = [
        "tenants/t_1/finetunes/ft_1/inputs/000.jpg",
        "tenants/t_1/finetunes/ft_1/inputs/001.jpg",
        "tenants/t_1/finetunes/ft_1/checkpoint/checkpoint.pt",
        "tenants/t_1/finetunes/ft_10/inputs/000.jpg",  # shares the prefix's characters only
        "tenants/t_1/adapters/ad_1_a1.safetensors",
    ]
    before = time.time() - 5
    for i, key in enumerate(keys):
        storage.put(key, b"x" * (i + 1))
    listed = {o.key: o for o in storage.list("tenants/t_1/finetunes/ft_1")}
    assert set(listed) == set(keys[:3])
    assert [listed[k].size for k in keys[:3]] == [1, 2, 3]
    assert all(before < o.modified < time.time() + 5 for o in listed.values())
    assert {o.key for o in storage.list("tenants")} == set(keys)
    assert list(storage.list("tenants/t_2")) == []
    storage.delete_prefix("tenants/t_1/finetunes/ft_1")
    assert {o.key for o in storage.list("tenants")} == set(keys[3:])
    storage.delete_prefix("tenants/t_1/finetunes/ft_1")  # nothing left: no error


def _begin_unfinished_write(storage: Storage, key: str) -> None:
    """What a process killed mid-write leaves: a temporary file beside the key (local), or a
    multipart upload with a part but never completed (s3)."""
    if isinstance(storage, LocalStorage):
        path = storage.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / f".tmp-{path.name}").write_bytes(b"half")
        return
    assert isinstance(storage, S3Storage)
    upload = storage.client.create_multipart_upload(Bucket=storage.bucket, Key=key)
    storage.client.upload_part(
        Bucket=storage.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"half"
    )


def _unfinished(storage: Storage) -> int:
    if isinstance(storage, LocalStorage):
        return sum(1 for p in storage.root.rglob(".*") if p.is_file())
    assert isinstance(storage, S3Storage)
    return len(storage.client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", []))


def test_unfinished_writes_are_invisible_and_collected_once_old(storage: Storage) -> None:
    key = "tenants/t_1/adapters/ad_1_a1.safetensors"
    storage.put("tenants/t_1/adapters/ad_2_a1.safetensors", b"whole")
    _begin_unfinished_write(storage, key)
    assert [o.key for o in storage.list("tenants")] == ["tenants/t_1/adapters/ad_2_a1.safetensors"]
    assert not storage.exists(key)
    # Begun after the cutoff: a write that may still be in flight is left alone.
    assert storage.collect_unfinished(time.time() - 3600) == []
    assert _unfinished(storage) == 1
    removed = storage.collect_unfinished(time.time() + 5)
    assert len(removed) == 1 and removed[0].startswith("tenants/t_1/adapters/")
    assert _unfinished(storage) == 0
    assert storage.exists("tenants/t_1/adapters/ad_2_a1.safetensors")  # whole objects stay


def test_large_file_round_trip_is_verified(storage: Storage, tmp_path: Path) -> None:
    """Above MULTIPART_BYTES an S3 upload goes in parts (its ETag is then no MD5): the
    download is checked against the sha256 stored with the object."""
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(MULTIPART_BYTES + 1024 * 1024))
    key = "tenants/t_1/exports/exp_1.safetensors"
    storage.put_file(key, source)
    assert storage.size(key) == source.stat().st_size
    dest = tmp_path / "copy" / "big.bin"
    storage.get_file(key, dest)
    assert (
        hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
    )
    assert [p.name for p in dest.parent.iterdir()] == ["big.bin"]  # no temporary file left
    with pytest.raises(FileNotFoundError):
        storage.get_file("tenants/t_1/exports/exp_2.safetensors", tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


def test_a_damaged_object_is_detected_on_download(storage: Storage, tmp_path: Path) -> None:
    if isinstance(storage, LocalStorage):
        pytest.skip("the local backend keeps no digest: its files are read in place")
    assert isinstance(storage, S3Storage)
    storage.put(KEY, b"the real image")
    stored = storage.client.head_object(Bucket=storage.bucket, Key=KEY)["Metadata"]
    # Bit rot in the store (or a writer that bypassed the interface): another body under the
    # same recorded digest.
    storage.client.put_object(
        Bucket=storage.bucket, Key=KEY, Body=b"a damaged image", Metadata=stored
    )
    dest = tmp_path / "img.png"
    with pytest.raises(DamagedObject, match="does not match"):
        storage.get_file(KEY, dest)
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_download_url(storage: Storage) -> None:
    storage.put(KEY, b"png bytes")
    url = storage.download_url(KEY, filename="x.png", media_type="image/png", expires_s=60)
    if isinstance(storage, LocalStorage):
        assert url is None  # the API streams local files itself
        return
    assert url is not None
    r = httpx.get(url)  # no credentials: the signature in the URL is the permission
    assert r.status_code == 200 and r.content == b"png bytes"
    assert r.headers["content-type"] == "image/png"
    assert r.headers["content-disposition"] == 'attachment; filename="x.png"'
    assert httpx.get(url.split("?")[0]).status_code == 403  # unsigned: refused


def test_keys_are_checked(storage: Storage) -> None:
    for bad in ("../etc/passwd", "/abs", "tenants/A/x.png", "tenants//x"):
        with pytest.raises(InvalidKey):
            storage.put(bad, b"x")


def test_settings_choose_the_backend(s3_server: S3Server, tmp_path: Path) -> None:
    from app.settings import Settings

    local = storage_from_settings(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalStorage) and local.root == (tmp_path / "files").resolve()
    s3 = storage_from_settings(Settings(**s3_server.settings()))  # type: ignore[arg-type]
    assert isinstance(s3, S3Storage) and s3.bucket == s3_server.bucket
    with pytest.raises(ValueError, match="TUNEQDM_S3_BUCKET"):
        Settings(storage_backend="s3")


def test_admin_storage_init_creates_the_bucket_once(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.cli import main
    from app.settings import get_settings

    for name, value in s3_server.settings(bucket="init-test").items():
        monkeypatch.setenv(f"TUNEQDM_{name.upper()}", value)
    get_settings.cache_clear()
    try:
        assert main(["storage", "init"]) == 0
        assert main(["storage", "init"]) == 0
    finally:
        get_settings.cache_clear()
    assert capsys.readouterr().out.splitlines() == [
        "bucket init-test created",
        "bucket init-test exists",
    ]
