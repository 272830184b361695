"""docker-compose.yml made runnable on a machine without a GPU, for the compose test (run.sh).

Reads the project's compose file and changes only what a CPU-only, registry-less machine needs:
the workers reserve no GPU and run the built-in model (models/fashion-sd) on the CPU; both GPU
worker services run (two workers to hand a job over); the API is published on a free port of
127.0.0.1 (written to ports.json) and nothing else is published; the services use the images
run.sh built from the project's Dockerfile instead of `build:`; the object store's identity is
a bind-mounted file (podman-compose 1.6.0 mounts no `configs:`). Everything else (commands,
health checks, dependencies, volumes, settings) is the compose file's own.

    python cpu_compose.py <repo root> <out.yml> <api image> <worker image>
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

import yaml


def cpu_compose(root: Path, out: Path, api_image: str, worker_image: str) -> dict[str, Any]:
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    for key in [k for k in compose if k.startswith("x-")]:
        del compose[key]
    services: dict[str, Any] = compose["services"]
    for name in ("worker-2", "flower", "prometheus", "grafana"):
        services.pop(name, None)  # another base, and the monitoring profile: not run here
    with socket.socket() as probe:  # the API on a free port: this machine may use 8000
        probe.bind(("127.0.0.1", 0))
        api_port = probe.getsockname()[1]
    (out.parent / "ports.json").write_text(json.dumps({"api": api_port}))
    for name, service in services.items():
        # Published ports only where the test reaches in (others may be taken on this host).
        if name == "api":
            service["ports"] = [f"127.0.0.1:{api_port}:8000"]
        else:
            service.pop("ports", None)
        build = service.pop("build", None)
        if build is not None:
            service["image"] = api_image if build["target"] == "api" else worker_image
        if name.startswith("worker-gpu"):
            service.pop("deploy", None)
            service.pop("profiles", None)
            env = service["environment"]
            env.update(
                TUNEQDM_DEVICE="cpu",
                TUNEQDM_MODEL="/models/fashion-sd",
                TUNEQDM_TORCH_THREADS="1",
            )
            service["volumes"] = [
                v if not v.endswith(":/models:ro") else f"{root / 'models'}:/models:ro"
                for v in service["volumes"]
            ]
    configs: dict[str, Any] = compose.pop("configs", None) or {}
    for name, config in configs.items():
        if "content" in config:
            path = out.parent / f"{name}.json"
            # Compose interpolates ${VAR:-default} in inline content; a file is read as is.
            content = re.sub(
                r"\$\{([A-Z0-9_]+):-([^}]*)\}",
                lambda m: os.environ.get(m.group(1)) or m.group(2),
                config.pop("content"),
            )
            path.write_text(content)
            config["file"] = str(path)
    # podman-compose 1.6.0 does not mount `configs:` into containers: the same file, bind-mounted
    # read-only where the service reads it.
    for service in services.values():
        for use in service.pop("configs", []):
            source = configs[use["source"]]["file"]
            service.setdefault("volumes", []).append(f"{source}:{use['target']}:ro")
    out.write_text(yaml.safe_dump(compose, sort_keys=False))
    return compose


if __name__ == "__main__":
    root, out, api, worker = sys.argv[1:5]
    cpu_compose(Path(root).resolve(), Path(out).resolve(), api, worker)
