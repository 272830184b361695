"""End to end over HTTP only: real uvicorn, a real Celery worker process, Redis, PostgreSQL.

API key (the admin CLI) → upload photos → fine-tune (tiny model) → adapter listed → generate →
the PNG decodes to the requested size; the fine-tune's and the generation's signed webhooks
arrive and verify with the Standard Webhooks reference verifier, and a delivery that a crashed
process left pending in the outbox is sent by the worker's sweep.
"""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
from PIL import Image
from safetensors import safe_open
from sqlalchemy import select
from standardwebhooks import Webhook

from app.db import make_engine, make_sessionmaker
from app.ids import new_id
from app.models import Tenant, WebhookDelivery, utcnow
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


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((dict(self.headers.items()), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_http_flow_with_real_processes(
    pg_url: str, logs: Path, tmp_path: Path, tiny_settings: dict[str, object]
) -> None:
    env = service_env(
        **tiny_settings,
        torch_threads=1,
        allow_private_webhooks="true",
        webhook_ports="[]",  # the test receiver listens on a random port
        heartbeat_s=1,
        sweep_every_s=2,
    )
    fields = create_key(env, "e2e")
    key, secret = fields["api key"], fields["webhook signing secret"]

    _Receiver.received = []
    hooks = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{hooks.server_address[1]}/hook"
    # What a process that crashed right after a job's final commit leaves behind: a pending
    # outbox row nobody was asked to send. The worker's sweep must send it.
    engine = make_engine(pg_url)
    with make_sessionmaker(engine)() as s:
        tenant_id = s.scalars(select(Tenant.id).where(Tenant.name == "e2e")).one()
        orphan = WebhookDelivery(
            id=new_id("msg"),
            tenant_id=tenant_id,
            job_kind="generation",
            job_id=new_id("gen"),
            url=hook_url,
            event="generation.failed",
            payload={"type": "generation.failed", "data": {"error": "left by a crash"}},
            status="pending",
            attempts=0,
            next_attempt_at=utcnow(),
        )
        s.add(orphan)
        s.commit()
    engine.dispose()
    port = free_port()
    api = start_api(env, logs, port)
    worker = start_worker(env, logs, "e2e")
    procs = [api, worker]
    base = f"http://127.0.0.1:{port}"
    try:
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"})
        wait_for("the API", lambda: answers_ready(client), 60, procs)
        start = time.perf_counter()
        r = post_finetune(client, {"steps": 4, "resolution": 32, "seed": 1}, webhook_url=hook_url)
        assert r.status_code == 202, r.text
        job = wait_final(client, f"/v1/finetunes/{r.json()['id']}", 240, procs)
        assert job["status"] == "succeeded", job
        adapter_id = job["adapter_id"]
        assert job["progress"] == {"step": 4, "total": 4}
        listed = client.get("/v1/adapters").json()
        assert [a["id"] for a in listed["data"]] == [adapter_id]
        assert listed["data"][0]["tokens"] == ["sks"] and listed["data"][0]["size_bytes"] > 0

        r = client.post(
            "/v1/generations",
            json={
                "adapter_id": adapter_id,
                "prompt": "a photo of sks dog on the beach",
                "steps": 3,
                "width": 32,
                "height": 48,
                "seed": 7,
                "webhook_url": hook_url,
            },
        )
        assert r.status_code == 202, r.text
        gen = wait_final(client, f"/v1/generations/{r.json()['id']}", 120, procs)
        assert gen["status"] == "succeeded", gen
        png = client.get(gen["images"][0]["url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (32, 48)
        elapsed = time.perf_counter() - start

        # The adapter as a LoRA, made by the worker, downloaded over HTTP.
        r = client.post(f"/v1/adapters/{adapter_id}/exports", json={"format": "lora", "rank": 8})
        assert r.status_code == 202, r.text
        export = r.json()

        def exported() -> bool:
            rows = client.get(f"/v1/adapters/{adapter_id}/exports").json()["data"]
            return bool(rows[0]["status"] in ("succeeded", "failed"))

        wait_for("the export", exported, 120, procs)
        listed_export = client.get(f"/v1/adapters/{adapter_id}/exports").json()["data"][0]
        assert listed_export["status"] == "succeeded", listed_export
        lora = client.get(export["links"]["file"])
        assert lora.status_code == 200 and len(lora.content) == listed_export["size_bytes"]
        (tmp_path / "lora.safetensors").write_bytes(lora.content)
        with safe_open(str(tmp_path / "lora.safetensors"), framework="pt") as handle:
            assert json.loads(handle.metadata()["tuneqdm_export"])["tokens"] == ["sks"]
            assert tuple(handle.get_tensor("unet.conv_in.lora_A.weight").shape) == (8, 4, 3, 3)

        wait_for("the webhooks", lambda: len(_Receiver.received) >= 3, 60, procs)
        verified = {}
        for headers, body in _Receiver.received:
            payload = Webhook(secret).verify(body, headers)
            verified[headers["webhook-id"]] = payload
        assert len(verified) == 3, verified  # one of each, no repeats
        by_type = {p["type"]: p["data"] for p in verified.values()}
        assert by_type["finetune.succeeded"]["adapter_id"] == adapter_id
        assert by_type["generation.succeeded"]["id"] == gen["id"]
        assert by_type["generation.failed"] == {"error": "left by a crash"}
        assert verified[orphan.id]["type"] == "generation.failed"
        # The jobs show their delivery.
        for url in (f"/v1/finetunes/{job['id']}", f"/v1/generations/{gen['id']}"):
            # (the sender records the outcome just after the receiver has answered)

            def delivered(url: str = url) -> bool:
                return bool(client.get(url).json()["webhook"]["status"] == "delivered")

            wait_for(f"{url} webhook delivered", delivered, 30, procs)
            assert client.get(url).json()["webhook"]["attempts"] == 1
        print(f"\nend-to-end HTTP flow: {elapsed:.1f} s (fine-tune 4 steps + generation)")
    finally:
        hooks.shutdown()
        for proc in procs:
            proc.stop()
