"""Transformer (flow-matching) bases served end to end with real processes: uvicorn, Celery
workers, Redis, PostgreSQL, and the tiny FLUX and SD3 pipelines (tuneqdm_core.builtin.tiny_dit).

A FLUX worker and an SD worker side by side each take only their own base's jobs; on each, a
fine-tune and a generation with its adapter succeed at the requested size. The same for an SD3
base alone, and for the embedded mode serving the FLUX base. The API refuses what the base's
family does not use (negative_prompt on FLUX, a scheduler it does not run) by name.
"""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from safetensors import safe_open

from tests.service.procs import (
    Proc,
    Service,
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

SD, FLUX, SD3 = "tiny-sd", "tiny-flux", "tiny-sd3"
# Tiny sizes: FLUX's native side is FluxPipeline's 128 × the tiny VAE's 2 = 256 px; a lower
# bound of 1/8 lets the test train and generate at 32 px.
COMMON: dict[str, Any] = {
    "torch_threads": 1,
    "min_size_factor": 0.125,
    "heartbeat_s": 1,
    "sample_steps": 2,
}
PARAMS = {"steps": 2, "resolution": 32, "seed": 1}
WIDTH, HEIGHT = 48, 32


def _claimed(proc: Proc, kind: str, job_id: str) -> bool:
    return any(
        f"{kind} " in line and job_id in line and "claimed" in line
        for line in proc.log().splitlines()
    )


def _bases(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in client.get("/v1/bases").raise_for_status().json()["data"]}


def _finetune_then_generate(
    client: httpx.Client,
    base: str,
    procs: list[Proc],
    params: dict[str, Any] | None = None,
    **generation: Any,
) -> tuple[str, str, str]:
    """A fine-tune on `base` (PARAMS and `params`), then a WIDTH × HEIGHT generation with its
    adapter; both must succeed, the image at the requested size. Returns (fine-tune,
    generation, adapter) ids."""
    r = post_finetune(client, {**PARAMS, **(params or {})}, photos=2, base=base)
    assert r.status_code == 202, r.text
    ft = r.json()
    assert (ft["base_model"], ft["params"]["resolution"]) == (base, 32)
    done = wait_final(client, f"/v1/finetunes/{ft['id']}", 300, procs)
    assert done["status"] == "succeeded", done
    adapter = done["adapter_id"]
    body = {"adapter_id": adapter, "prompt": "sks dog", "steps": 2, "seed": 3}
    r = client.post(
        "/v1/generations", json={**body, "width": WIDTH, "height": HEIGHT, **generation}
    )
    assert r.status_code == 202, r.text
    assert r.json()["base_model"] == base
    gen = wait_final(client, f"/v1/generations/{r.json()['id']}", 300, procs)
    assert gen["status"] == "succeeded", gen
    png = client.get(gen["images"][0]["url"]).raise_for_status().content
    assert Image.open(io.BytesIO(png)).size == (WIDTH, HEIGHT)
    return ft["id"], gen["id"], adapter


def test_flux_and_sd_workers_side_by_side(
    logs: Path,
    tiny_settings: dict[str, object],
    tiny_flux_dir: Path,
) -> None:
    """Jobs are routed by base (their queue and claim): each worker serves one base of its
    own family and never takes the other's jobs."""
    env_sd = service_env(**tiny_settings, **COMMON, base_model=SD)  # the API's default too
    env_flux = service_env(
        **{**tiny_settings, "model": str(tiny_flux_dir)}, **COMMON, base_model=FLUX
    )
    key = create_key(env_sd, "dit")["api key"]
    port = free_port()
    procs = [
        start_api(env_sd, logs, port),
        worker_sd := start_worker(env_sd, logs, "worker-sd"),
        worker_flux := start_worker(env_flux, logs, "worker-flux"),
    ]
    try:
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )

        def both_up() -> bool:
            try:
                listed = _bases(client)
            except httpx.TransportError:
                return False
            return all(listed.get(b, {}).get("workers_up") == 1 for b in (SD, FLUX))

        wait_for("the API and both workers", both_up, 120, procs)
        listed = _bases(client)
        flux, sd = listed[FLUX], listed[SD]
        assert (flux["family"], sd["family"]) == ("flux", "sd")
        assert (flux["native_resolution"], flux["sizes"]) == (
            256,
            {"default": 256, "min": 32, "max": 512},
        )
        assert flux["generation"] == {
            "steps": 28,
            "guidance_scale": 3.5,
            "guidance": "embedded",
            "guidance_meaning": flux["generation"]["guidance_meaning"],
            "scheduler": "euler",
            "schedulers": ["euler"],
            "negative_prompt": False,
        }
        # The native side, or 512 px where that is larger (FLUX and SD3): the tiny FLUX's 256.
        assert (flux["finetune"]["resolution"], sd["finetune"]["resolution"]) == (256, 32)
        assert sd["generation"]["steps"] == 30 and sd["generation"]["negative_prompt"] is True

        # What FLUX does not use is refused at submit, naming the field, base and family.
        for body, field in (
            ({"negative_prompt": "blurry"}, "negative_prompt"),
            ({"scheduler": "ddim"}, "scheduler"),
        ):
            r = client.post("/v1/generations", json={"base": FLUX, "prompt": "a dog", **body})
            assert r.status_code == 422, r.text
            problem = r.json()
            assert problem["errors"][0]["field"] == field
            assert f"'{FLUX}' (family flux)" in problem["detail"]

        # With a progress image: sampled at the base's native size with the family's guidance.
        sampled = {"validation_prompts": ["a photo of sks dog"], "sample_every": 2}
        ft_flux, gen_flux, _ = _finetune_then_generate(client, FLUX, procs, sampled)
        # Step 0 (the plain base, before training) and the last step.
        samples = client.get(f"/v1/finetunes/{ft_flux}/samples").json()["data"]
        assert [sample["step"] for sample in samples] == [0, 2]
        for sample in samples:
            png = client.get(sample["url"]).raise_for_status().content
            assert Image.open(io.BytesIO(png)).size == (256, 256)
        ft_sd, gen_sd, _ = _finetune_then_generate(client, SD, procs, negative_prompt="blurry")
        for proc, own, other in (
            (worker_flux, (ft_flux, gen_flux), (ft_sd, gen_sd)),
            (worker_sd, (ft_sd, gen_sd), (ft_flux, gen_flux)),
        ):
            assert _claimed(proc, "fine-tune", own[0]) and _claimed(proc, "generations", own[1])
            assert not _claimed(proc, "fine-tune", other[0])
            assert not _claimed(proc, "generations", other[1])
        # A FLUX generation without a size gets the family's defaults, stored resolved.
        r = client.post("/v1/generations", json={"base": FLUX, "prompt": "a dog", "steps": 1})
        assert r.status_code == 202, r.text
        assert (r.json()["guidance_scale"], r.json()["scheduler"], r.json()["width"]) == (
            3.5,
            "euler",
            256,
        )
        client.post(f"/v1/generations/{r.json()['id']}/cancel")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.stop()


def test_sd3_base_end_to_end(
    logs: Path, tiny_settings: dict[str, object], tiny_sd3_dir: Path, tmp_path: Path
) -> None:
    env = service_env(**{**tiny_settings, "model": str(tiny_sd3_dir)}, **COMMON, base_model=SD3)
    key = create_key(env, "dit")["api key"]
    with Service(env, logs) as service:
        service.wait_ready(key)
        with service.client(key, timeout=30) as client:
            base = _bases(client)[SD3]
            # The transformer's sample_size 16 × the tiny VAE's 2.
            assert (base["family"], base["native_resolution"]) == ("sd3", 32)
            assert base["generation"]["schedulers"] == ["euler", "heun", "dpmsolver++"]
            r = client.post("/v1/generations", json={"prompt": "a dog", "scheduler": "ddim"})
            assert r.status_code == 422 and r.json()["errors"][0]["field"] == "scheduler"
            # SD3 uses classifier-free guidance, so it takes a negative prompt.
            _, _, adapter = _finetune_then_generate(
                client, SD3, service.procs, negative_prompt="blurry", scheduler="heun"
            )
            # Its adapter exports as a LoRA on the transformer (kohya keys are UNet-only).
            exports = f"/v1/adapters/{adapter}/exports"
            r = client.post(exports, json={"format": "lora-kohya", "rank": 4})
            assert r.status_code == 422 and r.json()["errors"][0]["field"] == "format"
            r = client.post(exports, json={"format": "lora", "rank": 4})
            assert r.status_code == 202, r.text
            file_url = r.json()["links"]["file"]

            def exported() -> bool:
                status = client.get(exports).json()["data"][0]["status"]
                return bool(status in ("succeeded", "failed"))

            wait_for("the export", exported, 120, service.procs)
            assert client.get(exports).json()["data"][0]["status"] == "succeeded"
            lora = tmp_path / "lora.safetensors"
            lora.write_bytes(client.get(file_url).raise_for_status().content)
            with safe_open(str(lora), framework="pt") as handle:
                keys = list(handle.keys())
            assert keys and all(k.startswith("transformer.") for k in keys)


def test_the_embedded_mode_serves_a_flux_base(tmp_path: Path, tiny_flux_dir: Path) -> None:
    """`TUNEQDM_MODEL=<a FLUX folder> python -m worker.embedded`: its base is registered
    before the API serves, and a generation on it succeeds at the requested size."""
    port = free_port()
    env = service_env(torch_threads=1, model=tiny_flux_dir, base_model=FLUX, min_size_factor=0.125)
    log_path = tmp_path / "embedded.log"
    with log_path.open("wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "worker.embedded", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 180
            output = ""
            while "API key:" not in output:
                assert time.monotonic() < deadline, output
                assert launcher.poll() is None, output
                time.sleep(0.3)
                output = log_path.read_text(errors="replace")
            key = re.search(r"^API key: (tqk_\S+)$", output, re.M)
            assert key, output
            client = httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {key.group(1)}"},
                timeout=30,
            )
            [base] = _bases(client).values()
            assert (base["family"], base["native_resolution"]) == ("flux", 256)
            r = client.post(
                "/v1/generations",
                json={"prompt": "a dog", "steps": 2, "width": WIDTH, "height": HEIGHT},
            )
            assert r.status_code == 202, r.text
            url = f"/v1/generations/{r.json()['id']}"
            state: dict[str, Any] = {}

            def final() -> bool:
                assert launcher.poll() is None, log_path.read_text(errors="replace")
                state.update(client.get(url).raise_for_status().json())
                return state["status"] in ("succeeded", "failed", "canceled")

            while not final():
                assert time.monotonic() < deadline + 300, log_path.read_text(errors="replace")
                time.sleep(0.5)
            assert state["status"] == "succeeded", state
            png = client.get(state["images"][0]["url"]).raise_for_status().content
            assert Image.open(io.BytesIO(png)).size == (WIDTH, HEIGHT)
        finally:
            launcher.send_signal(signal.SIGTERM)
            assert launcher.wait(timeout=60) == 0, log_path.read_text(errors="replace")
