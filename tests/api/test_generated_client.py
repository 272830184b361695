"""Clients generated from the live OpenAPI document work, as an integrator would use them.

`openapi-python-client` (pinned in the dev extra) generates a package under another name than
our own `tuneqdm_client` into a temporary folder; with it, against the embedded service (API,
worker and the built-in model in real processes), the test uploads photos, waits for the
fine-tune, generates, downloads the image and reads typed 404, 409, 422 and 429 problems.

The same with TypeScript: `openapi-typescript` types and `openapi-fetch` calls (tests/api/ts,
type-checked by `tsc --strict`, run by Node); skipped without node and `npm ci` in tests/api/ts.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.service.procs import free_port, service_env
from tests.worker.conftest import photo_png

TS = Path(__file__).resolve().parent / "ts"
PACKAGE = "tuneqdm_api_gen"
GENERATOR = Path(sys.executable).with_name("openapi-python-client")
CONFIG = f"""\
project_name_override: tuneqdm-api-gen
package_name_override: {PACKAGE}
# The generator has no parser for image/png bodies; they are bytes like any download.
content_type_overrides:
  image/png: application/octet-stream
"""


class Embedded:
    """`python -m worker.embedded`: the API, a worker and the built-in model, on SQLite."""

    def __init__(self, folder: Path, **settings: object) -> None:
        self.port = free_port()
        self.log_path = folder / "embedded.log"
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.embedded", "--port", str(self.port)],
            cwd=folder,
            env=service_env(torch_threads=1, **settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        output = ""
        while "API key:" not in output:
            assert time.monotonic() < deadline and self.proc.poll() is None, output
            time.sleep(0.3)
            output = self.log_path.read_text(errors="replace")
        found = re.search(r"^API key: (tqk_\S+)$", output, re.M)
        assert found, output
        self.key = found.group(1)
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    # One job at a time per tenant, so a second submission answers 429.
    embedded = Embedded(tmp_path_factory.mktemp("embedded"), tenant_active_jobs=1)
    try:
        yield embedded
    finally:
        embedded.stop()


def generate_client(url: str, folder: Path) -> ModuleType:
    """Generate the client from `url`/openapi.json into `folder` and import it."""
    if not GENERATOR.exists():
        pytest.skip(f"{GENERATOR.name} is not installed (pip install -e '.[dev]')")
    doc = folder / "openapi.json"
    doc.write_bytes(httpx.get(f"{url}/openapi.json").raise_for_status().content)
    config = folder / "config.yml"
    config.write_text(CONFIG)
    out = folder / "generated"
    args = ["generate", "--path", str(doc), "--config", str(config), "--meta", "none"]
    result = subprocess.run(
        [str(GENERATOR), *args, "--output-path", str(out / PACKAGE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Every operation was generated: the generator drops the ones it cannot type, with a warning.
    assert "Endpoint will not be generated" not in result.stdout, result.stdout
    assert "response will be omitted" not in result.stdout, result.stdout
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out))


def _module(name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.{name}")


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory, service: Embedded) -> Iterator[ModuleType]:
    package = generate_client(service.url, tmp_path_factory.mktemp("client"))
    yield package
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def _wait(get: Any, timeout: float, service: Embedded) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = get()
        if str(job.status) in ("succeeded", "failed", "canceled"):
            return job
        assert time.monotonic() < deadline, f"still {job.status}\n{service.log()[-3000:]}"
        time.sleep(0.5)


def test_the_generated_client_trains_generates_and_reads_problems(
    gen: ModuleType, service: Embedded
) -> None:
    assert PACKAGE != "tuneqdm_client" and gen.__name__ == PACKAGE
    api = gen.AuthenticatedClient(base_url=service.url, token=service.key, timeout=60.0)
    models = _module("models")
    types = _module("types")
    finetunes = _module("api.finetunes")
    generations = _module("api.generations")
    create_ft = importlib.import_module(f"{finetunes.__name__}.create_finetune")
    get_ft = importlib.import_module(f"{finetunes.__name__}.get_finetune")
    cancel_ft = importlib.import_module(f"{finetunes.__name__}.cancel_finetune")
    create_gen = importlib.import_module(f"{generations.__name__}.create_generation")
    get_gen = importlib.import_module(f"{generations.__name__}.get_generation")
    image = importlib.import_module(f"{generations.__name__}.get_generated_image")

    # Photos as typed files, params as the typed FinetuneParams (sent as application/json).
    body = models.BodyCreateFinetune(
        instance_prompt="a photo of sks bag",
        images=[
            types.File(
                payload=io.BytesIO(photo_png(i)), file_name=f"{i}.png", mime_type="image/png"
            )
            for i in range(3)
        ],
        params=models.FinetuneParamsInput(steps=6, resolution=32),
    )
    job = create_ft.sync(client=api, body=body)
    assert isinstance(job, models.FinetunePublic), job
    assert job.params.steps == 6 and job.links.cancel == f"/v1/finetunes/{job.id}/cancel"

    # 429: this tenant may have one active job (TUNEQDM_TENANT_ACTIVE_JOBS=1).
    limited = create_ft.sync_detailed(client=api, body=body)
    assert limited.status_code == 429 and isinstance(limited.parsed, models.Problem)
    assert "active jobs limit" in limited.parsed.detail and limited.headers["retry-after"]

    done = _wait(lambda: get_ft.sync(job.id, client=api), 240, service)
    assert str(done.status) == "succeeded", (done.error, service.log()[-3000:])
    assert done.adapter_id and done.links.cancel is None  # nothing left to cancel

    # 409: canceling a finished job.
    conflict = cancel_ft.sync(job.id, client=api)
    assert isinstance(conflict, models.Problem) and conflict.status == 409
    assert conflict.type_ == "urn:tuneqdm:problem:conflict" and "succeeded" in conflict.detail

    # 404: no such job.
    missing = get_ft.sync("ft_" + "0" * 32, client=api)
    assert isinstance(missing, models.Problem) and missing.status == 404

    # 422: the field at fault is named, typed.
    bad = create_gen.sync(client=api, body=models.GenerationCreate(prompt="x", width=12_000))
    assert isinstance(bad, models.Problem) and bad.status == 422
    assert [e.field for e in bad.errors] == ["width"]

    created = create_gen.sync(
        client=api,
        body=models.GenerationCreate(
            adapter_id=done.adapter_id, prompt="a photo of sks bag", steps=4, seed=7
        ),
    )
    assert isinstance(created, models.GenerationPublic), created
    finished = _wait(lambda: get_gen.sync(created.id, client=api), 120, service)
    assert str(finished.status) == "succeeded", finished.error
    png = image.sync_detailed(created.id, 0, client=api)
    assert png.status_code == 200
    assert Image.open(io.BytesIO(png.content)).format == "PNG"


def test_a_typescript_client_type_checks_and_runs(service: Embedded, tmp_path: Path) -> None:
    node, tools = shutil.which("node"), TS / "node_modules"
    if node is None or not (tools / ".bin" / "tsc").exists():
        pytest.skip("needs node and `npm ci --prefix tests/api/ts`")
    work = tmp_path / "ts"
    work.mkdir()
    for name in ("generate.mjs", "check.ts", "tsconfig.json", "package.json"):
        shutil.copy(TS / name, work / name)
    (work / "node_modules").symlink_to(tools)
    doc = work / "openapi.json"
    doc.write_bytes(httpx.get(f"{service.url}/openapi.json").raise_for_status().content)
    photos = []
    for i in range(3):
        photos.append(work / f"{i}.png")
        photos[-1].write_bytes(photo_png(i))

    def run(*args: str, timeout: float = 120) -> str:
        done = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, (args, done.stdout, done.stderr, service.log()[-3000:])
        return done.stdout

    run(node, "generate.mjs", str(doc), "schema.ts")
    run(str(tools / ".bin" / "tsc"), "-p", "tsconfig.json")  # strict: the types line up
    out = run(node, "build/check.js", service.url, service.key, *map(str, photos), timeout=300)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["signature"] == "PNG" and result["png_bytes"] > 100, result


def test_the_generator_is_pinned() -> None:
    if not GENERATOR.exists() or not shutil.which(str(GENERATOR)):
        pytest.skip("openapi-python-client is not installed")
    out = subprocess.run([str(GENERATOR), "--version"], capture_output=True, text=True)
    assert "0.29.1" in out.stdout


def test_our_client_sends_a_zip_and_exports(service: Embedded, tmp_path: Path) -> None:
    """tuneqdm_client against the same service: photos as a .zip, the LoRA export, problems."""
    from tuneqdm_client import ApiError, Client

    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(3):
            zf.writestr(f"bag/{i}.png", photo_png(i))
    with Client(service.url, service.key) as client:
        job = client.create_finetune(None, "a photo of sks bag", images_zip=archive, steps=4)
        assert job["num_images"] == 3
        job = client.wait_finetune(job["id"], progress=False, timeout_s=240)
        assert job["status"] == "succeeded", (job["error"], service.log()[-3000:])
        adapter_id = job["adapter_id"]
        assert adapter_id is not None
        export = client.create_export(adapter_id, "lora", rank=4)
        deadline = time.monotonic() + 120
        while export["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, service.log()[-3000:]
            time.sleep(0.5)
            (export,) = client.list_exports(adapter_id)["data"]
        assert export["status"] == "succeeded", export["error"]
        path = client.download_export(export, tmp_path)
        assert path.read_bytes()[8:9] == b"{"  # a safetensors header follows its length
        with pytest.raises(ApiError) as bad:
            client.create_export(adapter_id, "lora")
        assert bad.value.status_code == 422 and bad.value.errors[0]["field"] == "body"
        assert bad.value.type == "urn:tuneqdm:problem:invalid-input"


def test_our_async_client_runs_calls_at_once(service: Embedded) -> None:
    from tuneqdm_client import ApiError, AsyncClient

    async def main() -> None:
        async with AsyncClient(service.url, service.key) as client:
            bases, missing = await asyncio.gather(
                client.bases(),
                client.get_finetune("ft_" + "0" * 32),
                return_exceptions=True,
            )
            assert not isinstance(bases, BaseException) and bases["count"] >= 1
            assert isinstance(missing, ApiError) and missing.status_code == 404
            assert missing.type == "urn:tuneqdm:problem:not-found"

    asyncio.run(main())
