"""How long the embedded default takes a new user: `make run`, then a fine-tune with only photos
and a prompt (every parameter at its default), timed from the POST to the poll that sees it
succeeded, and the worker's own phases from the job's event log.

    PYTHONPATH=. python benchmarks/embedded_timing.py [--runs 2] [--photos 4] [--json PATH]

Starts `python -m worker.embedded` (the launcher `make run` calls) in a temporary folder with
the shipped built-in model and the default settings, waits for its API key, then per run
uploads the photos (synthetic 64 px photos of one subject) with `instance_prompt` and nothing
else, polls every 0.2 s until the job is final, and reads its events: `running` (the worker
claimed it), the `phase` events (loading base, preparing photos, training, saving) and
`succeeded`. The first run of a fresh launcher includes the worker's first base load; later
runs find the base loaded, as a user's second fine-tune does.

The table, per run: steps, POST → succeeded (what the user waits), claim → first step (the
`training` phase: what the worker does before step 1), the training phase's length, and its
seconds per step. The event times are the database's clock, written when each phase begins.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in the other benchmarks (common.py)

import httpx

from benchmarks.summary import write_json
from tests.service.procs import free_port, service_env
from tests.worker.conftest import photo_png

FINAL = ("succeeded", "failed", "canceled")


def _start(folder: Path, port: int) -> tuple[subprocess.Popen[bytes], str, str]:
    log_path = folder / "embedded.log"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "worker.embedded", "--port", str(port)],
        cwd=folder,
        env=service_env(),  # the embedded defaults: no TUNEQDM_* from this shell
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    output = ""
    while "API key:" not in output:
        if time.monotonic() > deadline or launcher.poll() is not None:
            raise SystemExit(f"the embedded mode did not start:\n{output}")
        time.sleep(0.2)
        output = log_path.read_text(errors="replace")
    url = re.search(r"^URL: (\S+)$", output, re.M)
    key = re.search(r"^API key: (tqk_\S+)$", output, re.M)
    assert url and key, output
    return launcher, url.group(1), key.group(1)


def _events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/finetunes/{job_id}/events", params=params).raise_for_status()
        body = page.json()
        events += body["data"]
        if not body["has_more"]:
            return events
        cursor = body["next_cursor"]


def _at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["created_at"]).timestamp()


def one_run(client: httpx.Client, photos: int) -> dict[str, Any]:
    files = [("images", (f"{i}.png", photo_png(i), "image/png")) for i in range(photos)]
    start = time.perf_counter()
    created = client.post(
        "/v1/finetunes", files=files, data={"instance_prompt": "a photo of sks bag"}
    )
    created.raise_for_status()
    job_id = created.json()["id"]
    while (job := client.get(f"/v1/finetunes/{job_id}").raise_for_status().json())[
        "status"
    ] not in FINAL:
        time.sleep(0.2)
    waited = time.perf_counter() - start
    if job["status"] != "succeeded":
        raise SystemExit(f"the fine-tune ended {job['status']}: {job['error']}")
    events = _events(client, job_id)
    claimed = next(_at(e) for e in events if e["type"] == "running")
    phases = {e["data"]["phase"]: _at(e) for e in events if e["type"] == "phase"}
    ended = next(_at(e) for e in events if e["type"] == "succeeded")
    training = phases["training"]
    after = min([t for t in phases.values() if t > training] + [ended])
    steps = int(job["params"]["steps"])
    return {
        "steps": steps,
        "post_to_succeeded_s": waited,
        "claim_to_first_step_s": training - claimed,
        "phases_before_training": {
            name: round(t - claimed, 3) for name, t in phases.items() if t <= training
        },
        "training_s": after - training,
        "s_per_step": (after - training) / steps,
    }


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| run | steps | POST → succeeded s | claim → first step s | training s | s / step |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, r in enumerate(runs, 1):
        lines.append(
            f"| {i} | {r['steps']} | {r['post_to_succeeded_s']:.1f} | "
            f"{r['claim_to_first_step_s']:.2f} | {r['training_s']:.1f} | {r['s_per_step']:.3f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--json", metavar="PATH", help="write the numbers here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tuneqdm-embedded-") as tmp:
        launcher, url, key = _start(Path(tmp), free_port())
        try:
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
                runs = [one_run(client, args.photos) for _ in range(args.runs)]
        finally:
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(timeout=60)
    print(table(runs))
    for i, r in enumerate(runs, 1):
        print(f"run {i}: phases before step 1 (s after the claim): {r['phases_before_training']}")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    write_json(args.json, {"runs": runs, "command": " ".join(["python", *sys.argv])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
