"""docker-compose.yml and the Dockerfile, checked statically (no Docker engine runs here):
services, ports, health checks, settings names against the Settings class, and that every
command the images run exists in this project."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# One worker service per GPU: worker-gpu0, worker-gpu1, ...
GPU_WORKERS = {n: s for n, s in SERVICES.items() if re.fullmatch(r"worker-gpu\d+", n)}


def _substitute(value: str) -> str:
    """Compose interpolation: ${VAR:-default} → default; ${VAR:?error} (required) → a value."""
    value = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{[A-Z0-9_]+:\?[^}]*\}", "x" * 40, value)


def _stages() -> dict[str, str]:
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\w+)\s*$", DOCKERFILE, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _check_command(argv: list[str]) -> None:
    """The programs the containers start, and what they load, exist in this project."""
    if argv[:2] == ["sh", "-c"]:
        for part in argv[2].split("&&"):
            _check_command(shlex.split(part.replace("exec ", "", 1)))
        return
    program = argv[0]
    if program == "alembic":
        assert argv[1:] == ["upgrade", "head"]
        assert (ROOT / "alembic.ini").is_file() and (ROOT / "migrations" / "env.py").is_file()
    elif program == "tuneqdm-admin":
        assert argv[1:] == ["storage", "init"]
        assert 'tuneqdm-admin = "app.cli:main"' in (ROOT / "pyproject.toml").read_text()
    elif program == "uvicorn":
        assert "--factory" in argv
        module, attr = argv[argv.index("--factory") + 1].split(":")
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        assert f"def {attr}(" in source
    elif program == "celery":
        module = argv[argv.index("-A") + 1]
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
        assert argv[argv.index("-A") + 2] == "worker"
        queues = argv[argv.index("-Q") + 1].split(",")
        assert set(queues) <= {"finetune", "generate", "webhooks"}
    else:
        pytest.fail(f"unknown program {program!r} in {argv}")


def test_services_ports_and_health_checks() -> None:
    assert {"postgres", "redis", "api", "worker-gpu0", "worker-gpu1"} <= set(SERVICES)
    for name, service in SERVICES.items():
        assert service["healthcheck"]["test"], name
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    assert "ping" in SERVICES["redis"]["healthcheck"]["test"]
    assert SERVICES["api"]["ports"] == ["8000:8000"]
    assert SERVICES["api"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
        "s3": {"condition": "service_healthy"},
    }
    for worker in GPU_WORKERS.values():
        assert worker["depends_on"]["api"] == {"condition": "service_healthy"}


def test_the_image_migrates_and_inits_storage_before_its_command() -> None:
    """The image's own entrypoint, so `docker run` of the api image without compose does it too."""
    entrypoint = (ROOT / "deploy" / "docker-entrypoint.sh").read_text()
    assert os.access(ROOT / "deploy" / "docker-entrypoint.sh", os.X_OK)
    assert "COPY deploy/docker-entrypoint.sh /usr/local/bin/tuneqdm-entrypoint" in DOCKERFILE
    assert 'ENTRYPOINT ["tuneqdm-entrypoint"]' in DOCKERFILE
    steps = [line.strip() for line in entrypoint.splitlines() if line.strip()]
    upgrade = steps.index("alembic upgrade head")
    # The bucket exists before the API (or a worker, which waits for the API) uses it; then
    # the container's command replaces the shell.
    assert steps[upgrade + 1] == "tuneqdm-admin storage init"
    assert steps[-1] == 'exec "$@"'
    for part in ("alembic upgrade head", "tuneqdm-admin storage init"):
        _check_command(shlex.split(part))
    stages = _stages()
    assert (
        "ENV MIGRATE_ON_START=1" in stages["api"] and "ENV MIGRATE_ON_START=0" in stages["worker"]
    )
    assert SERVICES["api"]["build"]["target"] == "api"
    assert "MIGRATE_ON_START" not in (SERVICES["api"].get("environment") or {})
    assert SERVICES["api"]["command"][0] == "uvicorn"


def test_workers_are_healthy_once_their_base_is_loaded_and_metrics_are_scraped() -> None:
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    scraped: dict[str, int] = {}
    for job in prometheus["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            scraped.update({name: sd["port"] for name in sd["names"]})
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.split(":")
                scraped[host] = int(port)
    assert scraped["api"] == 8000
    for name in (*GPU_WORKERS, "worker-2"):
        env = SERVICES[name]["environment"]
        # The health check tests the file the worker writes once loaded and registered.
        ready = env["TUNEQDM_WORKER_READY_FILE"]
        assert SERVICES[name]["healthcheck"]["test"] == ["CMD", "test", "-f", ready]
        assert "start_period" in SERVICES[name]["healthcheck"]
        # Hub token passed through for gated models.
        assert env["HF_TOKEN"] == "${HF_TOKEN:-}"
        port = int(env["TUNEQDM_WORKER_METRICS_PORT"])
        assert scraped[name] == port and str(port) in SERVICES[name]["expose"]
        assert any(p.endswith(f":{port}") for p in SERVICES[name]["ports"]), name
    sender = SERVICES["webhooks"]
    port = int(sender["environment"]["TUNEQDM_WORKER_METRICS_PORT"])
    assert scraped["webhooks"] == port
    assert f"http://127.0.0.1:{port}/metrics" in " ".join(sender["healthcheck"]["test"])
    # A prefork pool: its children's metrics are summed through a folder (worker/metrics.py).
    assert (
        "--pool=prefork" in sender["command"] and sender["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    )
    # Every service that runs a worker is scraped.
    workers = {n for n, svc in SERVICES.items() if "celery" in (svc.get("command") or [])}
    assert workers - {"flower"} <= set(scraped)


def test_monitoring_profile_mounts_what_ships_in_deploy() -> None:
    prometheus, grafana = SERVICES["prometheus"], SERVICES["grafana"]
    assert prometheus["profiles"] == grafana["profiles"] == ["monitoring"]
    for service in (prometheus, grafana):
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).is_dir(), source
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    [source] = datasource["datasources"]
    assert source["url"] == "http://prometheus:9090"
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/tuneqdm.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}


def test_prerequisites_and_embedded_host_are_documented() -> None:
    header = (ROOT / "docker-compose.yml").read_text().split("\nname:")[0]
    deployment = " ".join((ROOT / "docs" / "deployment.md").read_text().split())
    for text in (" ".join(header.replace("#", "").split()), deployment):
        assert "NVIDIA Container Toolkit" in text and "2.23.1" in text
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^HOST \?= 127\.0\.0\.1$", makefile, re.M)
    assert "--host $(HOST)" in makefile
    assert "make run HOST=0.0.0.0" in deployment


def test_files_live_in_the_s3_service_and_no_volume_is_shared() -> None:
    settings = {k: _substitute(str(v)) for k, v in SERVICES["api"]["environment"].items()}
    assert settings["TUNEQDM_STORAGE_BACKEND"] == "s3"
    for name in (*GPU_WORKERS, "worker-2", "webhooks"):
        env = {k: _substitute(str(v)) for k, v in SERVICES[name]["environment"].items()}
        assert {k: env[k] for k in settings if k.startswith("TUNEQDM_S3_")} == {
            k: v for k, v in settings.items() if k.startswith("TUNEQDM_S3_")
        }, name
    # The endpoint names the s3 service and the port its gateway listens on.
    endpoint = re.fullmatch(r"http://(\w+):(\d+)", settings["TUNEQDM_S3_ENDPOINT_URL"])
    assert endpoint is not None and endpoint.group(1) in SERVICES
    store = SERVICES[endpoint.group(1)]
    assert f"-s3.port={endpoint.group(2)}" in store["command"] and "-s3" in store["command"]
    assert endpoint.group(2) in " ".join(store["healthcheck"]["test"])
    # The identity the store checks signatures against is the key pair the service signs with.
    [config] = store["configs"]
    assert f"-s3.config={config['target']}" in store["command"]
    identities = json.loads(_substitute(COMPOSE["configs"][config["source"]]["content"]))
    [credentials] = identities["identities"][0]["credentials"]
    assert credentials == {
        "accessKey": settings["TUNEQDM_S3_ACCESS_KEY_ID"],
        "secretKey": settings["TUNEQDM_S3_SECRET_ACCESS_KEY"],
    }
    assert len(settings["TUNEQDM_S3_BUCKET"]) >= 3  # S3's shortest bucket name
    # No named volume but the workers' model cache (base models and their quantized form, no
    # job's files) is mounted by two services: workers need no shared filesystem.
    mounts: dict[str, list[str]] = {}
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = _substitute(volume).split(":")[0]
            if source in (COMPOSE.get("volumes") or {}):
                mounts.setdefault(source, []).append(name)
    shared = {source for source, users in mounts.items() if len(users) > 1}
    assert shared == {"model-cache"}, mounts
    for name in (*GPU_WORKERS, "worker-2"):
        staging = SERVICES[name]["environment"]["TUNEQDM_STAGING_DIR"]
        worker_mounts = [_substitute(v).split(":")[1] for v in SERVICES[name]["volumes"]]
        assert not any(staging.startswith(m) for m in worker_mounts)  # inside the container


def _device_ids(worker: dict[str, Any]) -> list[str]:
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1 and devices[0]["driver"] == "nvidia", devices
    # Pinned by id: `count: 1` with --scale would put every replica on the same GPU.
    assert "count" not in devices[0] and devices[0]["capabilities"] == ["gpu"], devices
    return [str(i) for i in devices[0]["device_ids"]]


def test_one_worker_per_gpu_each_on_its_own_device() -> None:
    assert len(GPU_WORKERS) >= 2
    pinned = {name: _device_ids(worker) for name, worker in GPU_WORKERS.items()}
    # worker-gpuN reserves exactly GPU N: one device per process, no GPU shared.
    assert pinned == {name: [name.removeprefix("worker-gpu")] for name in GPU_WORKERS}
    ids = [i for ids in pinned.values() for i in ids]
    assert len(ids) == len(set(ids))
    # Each process names itself after its host (worker/jobs.py worker_name): distinct hostnames.
    hostnames = [w["hostname"] for w in GPU_WORKERS.values()]
    assert hostnames == list(GPU_WORKERS) and len(set(hostnames)) == len(hostnames)
    # Every GPU worker is the same worker but for its device (one anchor, `x-worker`).
    shared = dict(COMPOSE["x-worker"])
    for worker in GPU_WORKERS.values():
        assert {k: worker[k] for k in shared} == shared
    # The first GPU runs on a plain `docker compose up`; the others are opt-in.
    assert "profiles" not in GPU_WORKERS["worker-gpu0"]
    assert all(w["profiles"] == ["multi-gpu"] for n, w in GPU_WORKERS.items() if n != "worker-gpu0")


def test_worker_reserves_a_gpu_and_caches_the_model() -> None:
    for worker in GPU_WORKERS.values():
        env = worker["environment"]
        # The container sees only its reserved GPU, as device 0 ("cuda:1" would not exist).
        assert env["TUNEQDM_DEVICE"] in ("cuda", "cuda:0")
        mounts = {_substitute(v).split(":")[1] for v in worker["volumes"]}
        assert any(env["TUNEQDM_QUANT_CACHE_DIR"].startswith(m) for m in mounts)
        assert "/models" in mounts  # a mounted model folder, or a hub id in TUNEQDM_MODEL
        assert "--pool=solo" in worker["command"]  # one job at a time per process


def test_worker_gets_time_to_checkpoint_on_stop_and_restarts() -> None:
    for worker in GPU_WORKERS.values():
        # docker's default of 10 s can cut a generation or a checkpoint short; then the job
        # waits for its lease to run out instead of being resumed at once.
        grace = re.fullmatch(r"(\d+)(s|m)", worker["stop_grace_period"])
        assert grace is not None, worker["stop_grace_period"]
        assert int(grace.group(1)) * (60 if grace.group(2) == "m" else 1) >= 60
        # A worker whose job stalled exits for its restart (worker/jobs.py STALLED_EXIT).
        assert worker["restart"] in ("unless-stopped", "always", "on-failure")


def test_flower_is_an_optional_profile_on_the_same_broker() -> None:
    flower = SERVICES["flower"]
    assert flower["profiles"] == ["monitoring"]
    # Every other service but the extra GPUs' workers and the second base's worker runs on a
    # plain `docker compose up`.
    optional = {n for n, s in SERVICES.items() if "profiles" in s}
    monitoring = {"flower", "prometheus", "grafana"}
    assert optional == monitoring | {"worker-2"} | (set(GPU_WORKERS) - {"worker-gpu0"})
    broker = SERVICES["api"]["environment"]["TUNEQDM_BROKER_URL"]
    assert flower["environment"]["CELERY_BROKER_URL"] == broker
    assert flower["depends_on"] == {"redis": {"condition": "service_healthy"}}


def test_every_setting_name_exists_and_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in SERVICES.items():
        env = {
            k: v for k, v in (service.get("environment") or {}).items() if k.startswith("TUNEQDM_")
        }
        if not env:
            continue
        for key in [k for k in os.environ if k.startswith("TUNEQDM_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            assert key.removeprefix("TUNEQDM_").lower() in Settings.model_fields, (name, key)
            monkeypatch.setenv(key, _substitute(str(value)))
        # Read from the environment as the containers do; the production validator accepts it.
        assert Settings().env == "production", name


def test_every_setting_is_documented() -> None:
    table = (ROOT / "docs" / "settings.md").read_text()
    documented = set(re.findall(r"^\| `TUNEQDM_([A-Z0-9_]+)` \|", table, flags=re.M))
    assert documented == {f.upper() for f in Settings.model_fields}


def test_commands_refer_to_what_exists() -> None:
    for name, service in SERVICES.items():
        if "command" in service and "build" in service:
            _check_command(service["command"])
        if "build" in service:
            assert service["build"]["target"] in _stages(), name
    for stage, body in _stages().items():
        cmd = re.search(r"^CMD (\[.*\])$", body, flags=re.M)
        if cmd:
            _check_command(json.loads(cmd.group(1)))
        if stage == "api":
            assert 'pip install ".[api]"' in body and "torch" not in body
        if stage == "worker":
            assert body.index("TORCH_SPEC") < body.index('pip install ".[core,api]"')
            assert "ARG TORCH_SPEC=torch==2.13.0" in body


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "var"} <= set(ignored)


def test_a_second_base_is_a_second_worker_service() -> None:
    first, second = SERVICES["worker-gpu0"], SERVICES["worker-2"]
    assert second["profiles"] == ["second-base"]
    env1, env2 = first["environment"], second["environment"]
    # Its own base: name, model, bits; the same registry, broker and files as the first.
    assert _substitute(env2["TUNEQDM_BASE_MODEL"]) != _substitute(env1["TUNEQDM_BASE_MODEL"])
    assert {"TUNEQDM_MODEL", "TUNEQDM_BITS"} <= set(env2)
    for name in ("TUNEQDM_DATABASE_URL", "TUNEQDM_BROKER_URL", "TUNEQDM_S3_BUCKET"):
        assert env2[name] == env1[name], name
    assert second["volumes"] == first["volumes"]
    # The same command: `-Q finetune,generate` means its own base's queues (worker/celery_app.py).
    assert second["command"] == first["command"]
    assert second["stop_grace_period"] == first["stop_grace_period"]
    (device,) = second["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["device_ids"]


def _series(expr: str) -> set[str]:
    """tuneqdm_* series an expression reads, without the _bucket/_sum/_count of a histogram."""
    names = set(re.findall(r"\btuneqdm_[a-z0-9_]+", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_alerts_and_dashboard_read_only_documented_series() -> None:
    documented = _series((ROOT / "docs" / "api.md").read_text())
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads(
        (ROOT / "deploy" / "grafana" / "dashboards" / "tuneqdm.json").read_text()
    )
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = set().union(*(_series(e) for e in exprs))
    assert used and used <= documented, used - documented
    # The dashboard covers jobs, queues, latencies and GPU memory.
    for series in (
        "tuneqdm_jobs_finished_total",
        "tuneqdm_queue_oldest_age_seconds",
        "tuneqdm_queue_wait_seconds",
        "tuneqdm_finetune_step_seconds",
        "tuneqdm_generation_seconds",
        "tuneqdm_gpu_memory_allocated_bytes",
    ):
        assert series in used, series


def test_the_compose_test_runs_the_compose_file_on_the_cpu(tmp_path: Path) -> None:
    """deploy/compose-test/cpu_compose.py changes only what a CPU-only machine needs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cpu_compose", ROOT / "deploy" / "compose-test" / "cpu_compose.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "compose.yml"
    cpu = module.cpu_compose(ROOT, out, "api:t", "worker:t")
    services = cpu["services"]
    assert {"postgres", "redis", "s3", "api", "webhooks", "worker-gpu0", "worker-gpu1"} == set(
        services
    )
    for name in ("worker-gpu0", "worker-gpu1"):
        worker, original = services[name], SERVICES[name]
        assert "deploy" not in worker and worker["image"] == "worker:t"
        assert worker["environment"]["TUNEQDM_DEVICE"] == "cpu"
        # The compose file's own command, health check, grace period and dependencies.
        for key in ("command", "healthcheck", "stop_grace_period", "depends_on", "restart"):
            assert worker[key] == original[key], (name, key)
    assert services["api"]["image"] == services["webhooks"]["image"] == "api:t"
    assert services["api"]["command"] == SERVICES["api"]["command"]
    identities = json.loads((tmp_path / "s3-identities.json").read_text())
    assert identities["identities"][0]["credentials"][0]["accessKey"]
    # Mounted where the compose file's config puts it.
    [config] = SERVICES["s3"]["configs"]
    mount = f"{tmp_path / 's3-identities.json'}:{config['target']}:ro"
    assert mount in services["s3"]["volumes"] and "configs" not in cpu
    assert yaml.safe_load(out.read_text()) == cpu
