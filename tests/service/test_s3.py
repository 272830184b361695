"""The service on S3 storage with no shared filesystem: real uvicorn (two replicas, one
streaming downloads, one redirecting them), a real Celery worker whose only local folder is its
own empty data directory, PostgreSQL, Redis and a real S3-compatible store (SeaweedFS)."""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app import storage as st
from tests.s3server import S3Server
from tests.service.procs import (
    answers_ready,
    create_key,
    free_port,
    post_finetune,
    service_env,
    start_api,
    start_worker,
    wait_final,
    wait_for,
)

pytestmark = pytest.mark.slow  # make test-slow (docs/workers.md "Service tests")


def _keys(server: S3Server, prefix: str) -> list[str]:
    listed = server.client().list_objects_v2(Bucket=server.bucket, Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


def _object(server: S3Server, key: str) -> bytes:
    body: bytes = server.client().get_object(Bucket=server.bucket, Key=key)["Body"].read()
    return body


def test_finetune_generate_download_delete_on_s3_without_a_shared_filesystem(
    pg_url: str,
    redis_url: str,
    logs: Path,
    tmp_path: Path,
    tiny_model_dir: Path,
    quant_cache: Path,
    s3_server: S3Server,
) -> None:
    api_dir, worker_dir = tmp_path / "api", tmp_path / "worker"
    common: dict[str, Any] = {
        "database_url": pg_url,
        "broker_url": redis_url,
        **s3_server.settings(),
        # Photos stay until the fine-tune is deleted, so the deletion is what removes them.
        "photo_retention_s": 3600,
        "heartbeat_s": 1,
        "sweep_every_s": 2,
    }
    api_env = service_env(data_dir=api_dir, **common)
    redirect_env = service_env(data_dir=api_dir, download_redirect="true", **common)
    worker_env = service_env(
        data_dir=worker_dir,  # its own, empty: staging lives under it
        model=tiny_model_dir,
        quant_cache_dir=quant_cache,
        torch_threads=1,
        **common,
    )
    key = create_key(api_env, "s3")["api key"]
    port, redirect_port = free_port(), free_port()
    api = start_api(api_env, logs, port)
    redirecting = start_api(redirect_env, logs, redirect_port, name="api-redirect")
    worker = start_worker(worker_env, logs, "s3")
    procs = [api, redirecting, worker]
    auth = {"Authorization": f"Bearer {key}"}
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth)
        redirect = httpx.Client(base_url=f"http://127.0.0.1:{redirect_port}", headers=auth)
        for c in (client, redirect):
            wait_for("the API", partial(answers_ready, c), 60, procs)

        r = post_finetune(client, {"steps": 4, "resolution": 32, "seed": 1, "checkpoint_every": 2})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        photos = _keys(s3_server, "tenants/")
        assert len(photos) == 3 and all("/inputs/" in k for k in photos), photos
        tenant_id = photos[0].split("/")[1]

        def finished(url: str) -> dict[str, Any]:
            return wait_final(client, url, 240, procs)

        job = finished(f"/v1/finetunes/{job_id}")
        assert job["status"] == "succeeded", (job, worker.log()[-3000:])
        adapter_id = job["adapter_id"]
        prefix = st.finetune_prefix(tenant_id, job_id) + "/"
        # The checkpoint the worker uploaded went with the job's end; the photos stay (retention).
        assert sorted(k.rsplit("/", 2)[1] for k in _keys(s3_server, prefix)) == ["inputs"] * 3

        r = client.post(
            "/v1/generations",
            json={"adapter_id": adapter_id, "prompt": "a photo of sks dog", "steps": 3,
                  "width": 32, "height": 32, "seed": 7},
        )  # fmt: skip
        assert r.status_code == 202, r.text
        gen = finished(f"/v1/generations/{r.json()['id']}")
        assert gen["status"] == "succeeded", gen

        # Downloads: streamed by one replica, a 307 to the store by the other; the same bytes
        # as the stored objects in both cases.
        adapter = client.get(f"/v1/adapters/{adapter_id}").json()
        [adapter_key] = _keys(s3_server, f"tenants/{tenant_id}/adapters/")
        stored_adapter = _object(s3_server, adapter_key)
        assert len(stored_adapter) == adapter["size_bytes"]
        [image_key] = _keys(s3_server, st.generation_prefix(tenant_id, gen["id"]) + "/")
        image_url = gen["images"][0]["url"]
        for path, stored, media in (
            (f"/v1/adapters/{adapter_id}/file", stored_adapter, "application/octet-stream"),
            (image_url, _object(s3_server, image_key), "image/png"),
        ):
            streamed = client.get(path)
            assert streamed.status_code == 200, streamed.text
            assert streamed.headers["content-type"] == media
            assert streamed.content == stored
            moved = redirect.get(path)
            assert moved.status_code == 307, moved.text
            location = moved.headers["location"]
            assert location.startswith(s3_server.endpoint_url)
            fetched = httpx.get(location)  # no API key: the signature is the permission
            assert fetched.status_code == 200 and fetched.content == streamed.content
            assert fetched.headers["content-type"] == media
        image = Image.open(io.BytesIO(client.get(image_url).content))
        assert image.size == (32, 32)

        # Deleting the fine-tune (and its adapter) leaves no object of its photos behind.
        r = client.delete(f"/v1/finetunes/{job_id}", params={"delete_adapter": "true"})
        assert r.status_code == 204, r.text
        assert _keys(s3_server, prefix) == []
        assert _keys(s3_server, adapter_key) == []
        # No shared filesystem: the API never made a local storage folder, and the worker
        # keeps no copy of the photos, the checkpoint or the adapter in its staging folder.
        assert not (api_dir / "files").exists() and not (worker_dir / "files").exists()
        staged = [p for p in (worker_dir / "staging").rglob("*") if p.is_file()]
        assert staged == [], staged
    finally:
        for proc in procs:
            proc.stop()
        client_ = s3_server.client()
        for k in _keys(s3_server, "tenants/"):
            client_.delete_object(Bucket=s3_server.bucket, Key=k)
