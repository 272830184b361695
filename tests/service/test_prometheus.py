"""The monitoring that ships in deploy/prometheus/, checked by a real Prometheus server.

promtool checks the shipped scrape configuration and alert rules and runs the rules' unit tests.
Then Prometheus (Debian's `prometheus` package) scrapes a real API, a `--pool=solo` Celery worker
and a `--pool=prefork` webhook sender (multiprocess mode) every second while generations run,
and PromQL over what it stored gives back what the test produced: the rate of finished jobs
over the run, a histogram quantile of queue wait equal to the one computed from the jobs' own
rows, and the webhook deliveries the prefork children made.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import select

from app.db import make_engine, make_sessionmaker
from app.models import GenerationJob
from tests.service.procs import (
    ROOT,
    Proc,
    Service,
    create_key,
    free_port,
    service_env,
    wait_final,
    wait_for,
)
from worker.metrics import WAIT_BUCKETS

DEPLOY = ROOT / "deploy" / "prometheus"
JOBS = 4
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None or PROMTOOL is None,
        reason="Debian's prometheus package is not installed (.ci/run installs it)",
    ),
]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(
        (ROOT / "deploy" / "grafana" / "dashboards" / "tuneqdm.json").read_text()
    )
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _promtool(*args: str) -> str:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_shipped_config_rules_and_their_unit_tests() -> None:
    assert "SUCCESS" in _promtool("check", "config", "prometheus.yml")
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"]]
    assert f"SUCCESS: {len(alerts)} rules found" in _promtool("check", "rules", "alerts.yml")
    # Every alert has at least one unit test that expects it to fire.
    tests = yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())
    fired = {
        case["alertname"]
        for t in tests["tests"]
        for case in t["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == set(alerts)
    assert "SUCCESS" in _promtool("test", "rules", "alerts_test.yml")


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _scrape_config(tmp: Path, api: int, worker: int, webhooks: int) -> Path:
    """The shipped configuration with this test's targets and a one-second scrape."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / name) for name in config["rule_files"]]
    targets = {
        "tuneqdm-api": api,
        "tuneqdm-workers": worker,
        "tuneqdm-webhooks": webhooks,
    }
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [f"127.0.0.1:{targets[job['job_name']]}"]}]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class _Prometheus:
    def __init__(self, config: Path, tmp: Path, logs: Path) -> None:
        assert PROMETHEUS is not None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.proc = Proc("prometheus", args, service_env(), logs)

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        r = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10)
        body = r.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def scalar(self, promql: str, at: float | None = None) -> float | None:
        result = self.query(promql, at)
        return float(result[0]["value"][1]) if result else None

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False


def _bucket_quantile(q: float, values: list[float]) -> float:
    """PromQL's histogram_quantile over a histogram of `values` with the workers' buckets:
    linear interpolation inside the bucket that holds the rank (promql/quantile.go)."""
    bounds = [*WAIT_BUCKETS, float("inf")]
    counts = [sum(v <= le for v in values) for le in bounds]
    rank = q * counts[-1]
    b = next(i for i, c in enumerate(counts) if c >= rank)
    if b == len(bounds) - 1:
        return bounds[-2]
    start, count = 0.0, float(counts[b])
    if b > 0:
        start, count, rank = bounds[b - 1], count - counts[b - 1], rank - counts[b - 1]
    return start + (bounds[b] - start) * (rank / count)


def test_prometheus_scrapes_the_api_and_workers_and_computes_what_happened(
    pg_url: str, logs: Path, tmp_path: Path, tiny_settings: dict[str, object]
) -> None:
    worker_port, webhooks_port = free_port(), free_port()
    env = service_env(**tiny_settings, torch_threads=1, allow_private_webhooks="true")
    env["TUNEQDM_WEBHOOK_PORTS"] = "[]"
    key = create_key(env, "prom")["api key"]
    hooks = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{hooks.server_address[1]}/hook"

    # The GPU-style worker (solo) on the job queues, the sender (prefork) on webhooks only.
    ready = tmp_path / "ready"
    ready.write_text("left by an earlier run\n")  # a container restarted in place keeps it
    worker_env = {
        **env,
        "TUNEQDM_WORKER_METRICS_PORT": str(worker_port),
        "TUNEQDM_WORKER_READY_FILE": str(ready),
    }
    sender_env = {
        **env,
        "TUNEQDM_WORKER_METRICS_PORT": str(webhooks_port),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "multiproc"),
    }
    with Service(worker_env, logs, workers=0) as service:
        celery = ("-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel=INFO")
        quiet = ("--without-gossip", "--without-mingle")
        service.workers.append(
            Proc(
                "w0",
                [sys.executable, *celery, "--pool=solo", "-Q", "finetune,generate", *quiet],
                worker_env,
                logs,
            )
        )
        service.workers.append(
            Proc(
                "webhooks",
                [
                    sys.executable,
                    *celery,
                    "--pool=prefork",
                    "--concurrency=2",
                    "-Q",
                    "webhooks",
                    *quiet,
                ],
                sender_env,
                logs,
            )
        )
        config = _scrape_config(tmp_path, service.port, worker_port, webhooks_port)
        assert "SUCCESS" in _promtool("check", "config", str(config))
        prom = _Prometheus(config, tmp_path, logs)
        procs = [*service.procs, prom.proc]
        try:
            wait_for("prometheus", prom.answers, 30, procs)

            # The worker's health check: its ready file, written once the base is loaded (its
            # fingerprint registered) and the worker listed, before any job asked for it.
            def loaded() -> bool:
                # Removed when the worker starts, written again once the base is loaded.
                try:
                    return ready.read_text() == "tuneqdm/fashion-sd\n"
                except FileNotFoundError:
                    return False

            wait_for("the worker ready", loaded, 90, procs)
            with service.client(key, timeout=10) as client:
                [base] = client.get("/v1/bases").raise_for_status().json()["data"]
                assert base["fingerprint"] and len(base["workers"]) == 1, base
            finished = 'tuneqdm_jobs_finished_total{kind="generation",status="succeeded"}'

            def scraped_at_zero() -> bool:
                up = prom.query("up == 1")
                return len(up) == 3 and prom.scalar(f"sum({finished})") == 0

            # Every target up, and the worker's declared counter stored at 0 before any job.
            wait_for("all targets scraped", scraped_at_zero, 60, procs)

            with service.client(key, timeout=10) as client:
                ids = []
                for seed in range(JOBS):
                    r = client.post(
                        "/v1/generations",
                        json={
                            "prompt": "a photo of a dog",
                            "steps": 2,
                            "width": 32,
                            "height": 32,
                            "seed": seed,
                            "webhook_url": hook_url,
                        },
                    )
                    assert r.status_code == 202, r.text
                    ids.append(r.json()["id"])
                for gen_id in ids:
                    gen = wait_final(client, f"/v1/generations/{gen_id}", 120, procs)
                    assert gen["status"] == "succeeded", gen

            delivered = 'sum(tuneqdm_webhook_delivery_seconds_count{outcome="delivered"})'
            wait_for(
                "the final counts scraped",
                lambda: prom.scalar(f"sum({finished})") == JOBS and prom.scalar(delivered) == JOBS,
                60,
                procs,
            )

            # The rate over exactly the stored samples (Prometheus 2's range selectors include
            # both ends, so nothing is extrapolated), from the 0 before the first job to the
            # last scrape: the jobs the test ran, divided by that time.
            [series] = prom.query(f"{finished}[10m]")
            first_t, first_v = series["values"][0]
            last_t, last_v = series["values"][-1]
            assert (float(first_v), float(last_v)) == (0, JOBS)
            span_ms = round((float(last_t) - float(first_t)) * 1000)
            rate = prom.scalar(f"sum(rate({finished}[{span_ms}ms]))", at=float(last_t))
            assert rate == pytest.approx(JOBS / (span_ms / 1000), rel=1e-9)

            # Queue wait: what the rows say each generation waited (submitted → claimed),
            # through PromQL's histogram_quantile over the worker's buckets.
            engine = make_engine(pg_url)
            with make_sessionmaker(engine)() as session:
                waits = [
                    (started - created).total_seconds()
                    for created, started in session.execute(
                        select(GenerationJob.created_at, GenerationJob.started_at)
                    )
                    if started is not None
                ]
            engine.dispose()
            assert len(waits) == JOBS
            wait = 'tuneqdm_queue_wait_seconds_bucket{kind="generation"}'
            for q in (0.5, 0.9):
                got = prom.scalar(f"histogram_quantile({q}, sum by (le) ({wait}))")
                assert got == pytest.approx(_bucket_quantile(q, waits), rel=1e-6), (q, waits)
            count = prom.scalar('sum(tuneqdm_queue_wait_seconds_count{kind="generation"})')
            assert count == JOBS

            # Series every scrape of the API carries, and no alert fires on a healthy run
            # (TuneqdmWebhookFailures, TuneqdmNoWorkersForBase, ...).
            assert prom.scalar('sum(tuneqdm_workers_up{base="tuneqdm/fashion-sd"})') == 1
            assert prom.scalar("count(tuneqdm_build_info)") == 3
            assert prom.query('ALERTS{alertstate="firing"}') == []
            # Every query of the shipped Grafana dashboard is valid PromQL on this server, and
            # the job panels show this run.
            for expr in dashboard_queries():
                prom.query(expr.replace("$__rate_interval", "1m").replace("$base", ".*"))
        finally:
            prom.proc.stop()
            hooks.shutdown()
    assert not ready.exists()  # a stopped worker is not ready
