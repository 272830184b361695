"""`webhook_events` with real processes (uvicorn, a Celery worker, PostgreSQL): a fine-tune that
asked for running, progress and succeeded receives them, signed, in that order, and its
progress webhooks in step order."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
from standardwebhooks import Webhook

from tests.service.procs import (
    answers_ready,
    create_key,
    free_port,
    service_env,
    start_api,
    start_worker,
    wait_final,
    wait_for,
)
from tests.worker.conftest import photo_png


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((dict(self.headers.items()), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_finetune_receives_running_progress_and_succeeded_in_order(
    pg_url: str, logs: Path, tiny_settings: dict[str, object]
) -> None:
    env = service_env(
        **tiny_settings,
        torch_threads=1,
        allow_private_webhooks="true",
        webhook_ports="[]",  # the test receiver listens on a random port
        webhook_progress_every_s=0,
        heartbeat_s=1,
        sweep_every_s=2,
    )
    fields = create_key(env, "events")
    key, secret = fields["api key"], fields["webhook signing secret"]
    _Receiver.received = []
    hooks = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{hooks.server_address[1]}/hook"
    port = free_port()
    procs = [start_api(env, logs, port), start_worker(env, logs, "events")]
    try:
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}
        )
        wait_for("the API", lambda: answers_ready(client), 60, procs)
        r = client.post(
            "/v1/finetunes",
            files=[("images", (f"{i}.png", photo_png(i), "image/png")) for i in range(3)],
            data={
                "instance_prompt": "a photo of sks dog",
                "params": json.dumps({"steps": 6, "resolution": 32, "seed": 1}),
                "webhook_url": hook_url,
                "webhook_events": ["running", "progress", "succeeded"],
            },
        )
        assert r.status_code == 202, r.text
        job = wait_final(client, f"/v1/finetunes/{r.json()['id']}", 240, procs)
        assert job["status"] == "succeeded", job

        def final_received() -> bool:
            return any(b'"finetune.succeeded"' in body for _, body in _Receiver.received)

        wait_for("the final webhook", final_received, 60, procs)
        payloads = [Webhook(secret).verify(body, headers) for headers, body in _Receiver.received]
        types = [p["type"] for p in payloads]
        assert types[0] == "finetune.running" and types[-1] == "finetune.succeeded", types
        assert set(types[1:-1]) == {"finetune.progress"}, types
        steps = [p["data"]["progress"]["step"] for p in payloads]
        assert steps == sorted(steps) and steps[-1] == 6, steps
    finally:
        hooks.shutdown()
        for proc in procs:
            proc.stop()
