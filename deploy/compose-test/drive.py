"""Drive the compose stack that run.sh started: health, one fine-tune, one generation, and a
worker stopped in the middle of a fine-tune whose job then finishes on the other worker.

    python drive.py <work dir> -- <podman-compose command...>

Podman without systemd does not run health checks on a timer: a thread here runs
`podman healthcheck run` for every container of the project, which is what moves them to
healthy (and lets `depends_on: condition: service_healthy` proceed).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

PROJECT = "tuneqdm"


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def containers() -> list[str]:
    out = sh(
        "podman",
        "ps",
        "--filter",
        f"label=io.podman.compose.project={PROJECT}",
        "--format",
        "{{.Names}}",
        check=False,
    )
    return out.split()


def health(name: str) -> str:
    out = sh("podman", "inspect", name, check=False)
    if not out.strip():
        return "absent"
    state = json.loads(out)[0]["State"]
    # Podman 4 names it Healthcheck (Health in later versions, as Docker does).
    check = state.get("Health") or state.get("Healthcheck") or {}
    return str(check.get("Status") or state.get("Status") or "none")


class HealthDriver(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(3):
            for name in containers():
                subprocess.run(["podman", "healthcheck", "run", name], capture_output=True)


def wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(2)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def photo(i: int) -> bytes:
    image = Image.new("RGB", (64, 64), (40 * i % 255, 120, 200))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def final(client: httpx.Client, url: str, timeout: float) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        state = client.get(url).raise_for_status().json()
        return state if state["status"] in ("succeeded", "failed", "canceled") else None

    return dict(wait(url, done, timeout))


def finetune(client: httpx.Client, params: dict[str, Any]) -> str:
    r = client.post(
        "/v1/finetunes",
        files=[("images", (f"{i}.png", photo(i), "image/png")) for i in range(3)],
        data={"instance_prompt": "a photo of sks shirt", "params": json.dumps(params)},
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def psql(query: str) -> str:
    password = os.environ.get("POSTGRES_PASSWORD", "tuneqdm")  # the compose file's default
    return sh(
        "podman",
        "exec",
        "-e",
        f"PGPASSWORD={password}",
        f"{PROJECT}_postgres_1",
        "psql",
        "-h",
        "127.0.0.1",
        "-U",
        "tuneqdm",
        "-d",
        "tuneqdm",
        "-Atc",
        query,
    ).strip()


def main() -> int:
    work = Path(sys.argv[1])
    compose = sys.argv[sys.argv.index("--") + 1 :]
    api_port = json.loads((work / "ports.json").read_text())["api"]
    driver = HealthDriver()
    driver.start()
    started = time.monotonic()
    say("podman-compose up -d")
    up = subprocess.run([*compose, "up", "-d"], capture_output=True, text=True, timeout=1800)
    print(up.stdout[-4000:], up.stderr[-4000:], sep="\n")
    names = containers()
    say(f"containers: {names}")
    expected = {
        f"{PROJECT}_{s}_1"
        for s in ("postgres", "redis", "s3", "api", "worker-gpu0", "worker-gpu1", "webhooks")
    }
    try:
        for name in sorted(expected):
            wait(f"{name} healthy", lambda n=name: health(n) == "healthy", 600)
            say(f"{name}: healthy")
        say(f"every service healthy after {time.monotonic() - started:.0f} s")
        out = sh(
            "podman",
            "exec",
            f"{PROJECT}_api_1",
            "tuneqdm-admin",
            "keys",
            "create",
            "--tenant",
            "ops",
        )
        key = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)["api key"]
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{api_port}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        bases = client.get("/v1/bases").raise_for_status().json()["data"]
        say(f"bases: {[(b['name'], b['workers_up'], b['fingerprint']) for b in bases]}")

        job_id = finetune(client, {"steps": 4, "seed": 1})
        job = final(client, f"/v1/finetunes/{job_id}", 600)
        say(f"fine-tune {job_id}: {job['status']} {job.get('error') or ''}")
        assert job["status"] == "succeeded", job
        r = client.post(
            "/v1/generations",
            json={
                "adapter_id": job["adapter_id"],
                "prompt": "a photo of sks shirt",
                "steps": 4,
                "seed": 2,
            },
        )
        assert r.status_code == 202, r.text
        gen = final(client, f"/v1/generations/{r.json()['id']}", 600)
        say(f"generation {gen['id']}: {gen['status']}")
        assert gen["status"] == "succeeded", gen
        png = client.get(gen["images"][0]["url"])
        size = Image.open(io.BytesIO(png.content)).size
        say(f"image: {png.headers['content-type']} {size}")

        # Long enough to be stopped in the middle (a few seconds per step here on a CPU).
        long_id = finetune(client, {"steps": 60, "seed": 3, "checkpoint_every": 5})
        wait(
            "the long fine-tune at step 15",
            lambda: (
                (client.get(f"/v1/finetunes/{long_id}").json().get("progress") or {}).get("step", 0)
                >= 15
            ),
            600,
        )
        owner = psql(f"select lease_owner from finetune_jobs where id = '{long_id}'")
        host = owner.split(":")[0]
        victim = f"{PROJECT}_{host}_1"
        say(f"fine-tune {long_id} runs on {owner}; podman stop {victim}")
        sh("podman", "stop", "-t", "120", victim)
        job = final(client, f"/v1/finetunes/{long_id}", 900)
        owner_after = psql(f"select lease_owner from finetune_jobs where id = '{long_id}'")
        attempts = psql(f"select attempts from finetune_jobs where id = '{long_id}'")
        resumed = psql(f"select resumed_from_step from finetune_jobs where id = '{long_id}'")
        events = psql(
            f"select type || ':' || coalesce(data->>'reason', data->>'step', '') "
            f"from finetune_events where job_id = '{long_id}' and type in "
            f"('running', 'released') order by id"
        )
        say(
            f"fine-tune {long_id}: {job['status']} on {owner_after} (attempts {attempts}, "
            f"resumed from step {resumed}); events: {events.splitlines()}"
        )
        assert job["status"] == "succeeded", job
        assert owner_after.split(":")[0] != host
        say(f"compose test passed in {time.monotonic() - started:.0f} s")
        return 0
    except Exception as exc:
        say(f"FAILED: {exc}")
        for name in containers() or sorted(expected):
            print(f"--- {name} ({health(name)})")
            print(sh("podman", "logs", "--tail", "40", name, check=False))
        return 1
    finally:
        driver.stop.set()


if __name__ == "__main__":
    sys.exit(main())
