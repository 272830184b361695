"""`Client`: one method per API operation, plus waiting with a progress bar and downloads."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, cast

import httpx

from tuneqdm_client.progress import ProgressBar
from tuneqdm_client.types import (
    Adapter,
    AdapterPage,
    BasePage,
    CheckpointPage,
    EventPage,
    Export,
    ExportPage,
    FieldError,
    Finetune,
    FinetunePage,
    Generation,
    GenerationPage,
    Problem,
    SamplePage,
)

# What the service accepts (it checks the content, not the name); other files in a folder are
# skipped so a stray .DS_Store or notes.txt does not fail the upload.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
FINAL = ("succeeded", "failed", "canceled")


class ApiError(Exception):
    """The API answered with an error (an RFC 9457 problem): `detail` says what to fix,
    `errors` names each field at fault for invalid input, `type` tells kinds apart
    (urn:tuneqdm:problem:conflict, ...), `retry_after_s` comes with 429 and 503."""

    def __init__(
        self,
        status_code: int,
        detail: str,
        *,
        problem: Problem | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        self.status_code = status_code
        self.detail = detail
        self.problem: Problem = problem or {
            "type": "about:blank",
            "title": "",
            "status": status_code,
            "detail": detail,
        }
        self.type = self.problem["type"]
        self.errors: list[FieldError] = list(self.problem.get("errors") or [])
        self.retry_after_s = retry_after_s
        super().__init__(f"{status_code}: {detail}")


class JobFailed(Exception):
    """A job ended in `failed` or `canceled`; `job` is its final state, `job["error"]` says why."""

    def __init__(self, job: Finetune | Generation) -> None:
        self.job = job
        super().__init__(f"{job['id']} {job['status']}: {job.get('error') or 'no message'}")


def image_files(images: str | Path | Iterable[str | Path]) -> list[Path]:
    """A folder's photos (sorted by name), or the given files as they are."""
    if isinstance(images, (str, Path)):
        path = Path(images)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"{path} holds no {'/'.join(IMAGE_SUFFIXES)} files")
            return files
        return [path]
    return [Path(p) for p in images]


class Client:
    """A client of one tuneqdm service, authenticated with one API key.

    Every method raises `ApiError` (with the API's `detail`) when the service refuses a request,
    and httpx's own exceptions when the service cannot be reached.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        _raise_for(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # --- fine-tunes -------------------------------------------------------------------------

    def create_finetune(
        self,
        images: str | Path | Iterable[str | Path] | None,
        instance_prompt: str,
        *,
        images_zip: str | Path | None = None,
        image_urls: Iterable[str] | None = None,
        class_prompt: str | None = None,
        name: str | None = None,
        token: str = "sks",
        base: str | None = None,
        webhook_url: str | None = None,
        webhook_events: Iterable[str] | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Finetune:
        """Upload the photos (a folder, one file, or a list of files; or None) and/or a .zip
        of photos (`images_zip`), and/or name https URLs the service fetches them from
        (`image_urls`), and start a fine-tune.

        `webhook_events` chooses the events `webhook_url` receives (running, progress,
        samples, succeeded, failed, canceled; None: the final states).
        Keyword arguments beyond the named ones are training params (steps=200, resolution=512,
        method="peqa", ...; docs/api.md lists them). `base` names the base it trains on (one of
        `bases()`; None: the service's default).
        """
        form: dict[str, str | list[str]] = {"instance_prompt": instance_prompt, "token": token}
        for key, value in (("class_prompt", class_prompt), ("name", name), ("base", base)):
            if value is not None:
                form[key] = value
        if webhook_url is not None:
            form["webhook_url"] = webhook_url
        # Repeated form fields, one part per value.
        if webhook_events is not None:
            form["webhook_events"] = list(webhook_events)
        if image_urls is not None:
            form["image_urls"] = list(image_urls)
        if params:
            form["params"] = json.dumps(params)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        handles: list[IO[bytes]] = []
        try:
            files = []
            for path in image_files(images) if images is not None else []:
                handle = path.open("rb")
                handles.append(handle)
                files.append(("images", (path.name, handle, "application/octet-stream")))
            if images_zip is not None:
                handle = Path(images_zip).open("rb")  # noqa: SIM115 - closed below
                handles.append(handle)
                files.append(("images_zip", (Path(images_zip).name, handle, "application/zip")))
            return cast(
                Finetune,
                self._json("POST", "/v1/finetunes", data=form, files=files, headers=headers),
            )
        finally:
            for opened in handles:
                opened.close()

    def get_finetune(self, finetune_id: str) -> Finetune:
        return cast(Finetune, self._json("GET", f"/v1/finetunes/{finetune_id}"))

    def list_finetunes(
        self, *, status: str | None = None, limit: int = 20, offset: int = 0
    ) -> FinetunePage:
        query = _query(status=status, limit=limit, offset=offset)
        return cast(FinetunePage, self._json("GET", "/v1/finetunes", params=query))

    def cancel_finetune(self, finetune_id: str) -> Finetune:
        return cast(Finetune, self._json("POST", f"/v1/finetunes/{finetune_id}/cancel"))

    def delete_finetune(self, finetune_id: str) -> None:
        self._request("DELETE", f"/v1/finetunes/{finetune_id}")

    def samples(self, finetune_id: str) -> SamplePage:
        """The progress images made so far (params.validation_prompts), by step."""
        return cast(SamplePage, self._json("GET", f"/v1/finetunes/{finetune_id}/samples"))

    def download_samples(self, finetune_id: str, folder: str | Path) -> list[Path]:
        """Save the progress images as `<folder>/<id>-<step>-<prompt index>.png`."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        return [
            self._download(s["url"], out / f"{finetune_id}-{s['step']}-{s['prompt_index']}.png")
            for s in self.samples(finetune_id)["data"]
        ]

    def checkpoints(self, finetune_id: str) -> CheckpointPage:
        """The adapters kept at the progress-image steps (params.keep_checkpoints), by step."""
        return cast(CheckpointPage, self._json("GET", f"/v1/finetunes/{finetune_id}/checkpoints"))

    def promote_checkpoint(self, finetune_id: str, step: int) -> Adapter:
        """Make the checkpoint kept at `step` an adapter of its own (the job must have
        finished); use its id like any adapter's."""
        return cast(
            Adapter,
            self._json("POST", f"/v1/finetunes/{finetune_id}/checkpoints/{step}/promote"),
        )

    def events(
        self, finetune_id: str, *, cursor: str | None = None, limit: int | None = None
    ) -> EventPage:
        """One page of the job's event log after `cursor` (the `next_cursor` of a previous
        page; None: from the first event)."""
        query = _query(cursor=cursor, limit=limit)
        return cast(
            EventPage, self._json("GET", f"/v1/finetunes/{finetune_id}/events", params=query)
        )

    def wait_finetune(
        self,
        finetune_id: str,
        *,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
        progress: bool = True,
        stream: IO[str] | None = None,
    ) -> Finetune:
        """Poll until the job has finished; draw a progress bar on stderr while it runs.

        Returns the succeeded job; raises JobFailed (failed or canceled) or TimeoutError.
        """
        bar = ProgressBar(stream or sys.stderr, label=finetune_id) if progress else None
        job = _poll(lambda: self.get_finetune(finetune_id), poll_s, timeout_s, bar)
        if job["status"] != "succeeded":
            raise JobFailed(job)
        return job

    # --- adapters ---------------------------------------------------------------------------

    def bases(self) -> BasePage:
        """The bases this service serves, with their sizes, workers and queued jobs."""
        return cast(BasePage, self._json("GET", "/v1/bases"))

    def list_adapters(self, *, limit: int = 20, offset: int = 0) -> AdapterPage:
        query = _query(limit=limit, offset=offset)
        return cast(AdapterPage, self._json("GET", "/v1/adapters", params=query))

    def get_adapter(self, adapter_id: str) -> Adapter:
        return cast(Adapter, self._json("GET", f"/v1/adapters/{adapter_id}"))

    def delete_adapter(self, adapter_id: str) -> None:
        self._request("DELETE", f"/v1/adapters/{adapter_id}")

    def upload_adapter(
        self, path: str | Path, *, name: str | None = None, base: str | None = None
    ) -> Adapter:
        """Upload an adapter file written by `tuneqdm finetune` into the registry. The service
        checks it was made for one of its bases (`base`, or the one its fingerprint names)."""
        form = {key: value for key, value in (("name", name), ("base", base)) if value is not None}
        with Path(path).open("rb") as handle:
            files = {"file": (Path(path).name, handle, "application/octet-stream")}
            return cast(Adapter, self._json("POST", "/v1/adapters", data=form, files=files))

    def download_adapter(self, adapter_id: str, path: str | Path) -> Path:
        """Save the adapter's safetensors file at `path` (a folder gets `<id>.safetensors`)."""
        target = Path(path)
        if target.is_dir():
            target = target / f"{adapter_id}.safetensors"
        return self._download(f"/v1/adapters/{adapter_id}/file", target)

    # --- exports ----------------------------------------------------------------------------

    def create_export(
        self,
        adapter_id: str,
        format: str = "lora",
        *,
        rank: int | None = None,
        interval: str = "mean",
        webhook_url: str | None = None,
        webhook_events: list[str] | None = None,
    ) -> Export:
        """Ask a worker for the adapter as a LoRA file (`rank` needed) or a merged UNet; the same
        request again returns the same export. `webhook_url` gets a signed POST for each of
        `webhook_events` (running, succeeded, failed, canceled; default the final states); only
        the request that queues an export may set its webhook."""
        body = _query(
            format=format,
            rank=rank,
            interval=interval,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
        )
        return cast(Export, self._json("POST", f"/v1/adapters/{adapter_id}/exports", json=body))

    def list_exports(self, adapter_id: str) -> ExportPage:
        return cast(ExportPage, self._json("GET", f"/v1/adapters/{adapter_id}/exports"))

    def download_export(self, export: Export, path: str | Path) -> Path:
        """Save a succeeded export's file at `path` (a folder gets `<adapter>-<variant>` name)."""
        target = Path(path)
        if target.is_dir():
            target = target / f"{export['adapter_id']}-{export['id']}.safetensors"
        return self._download(export["links"]["file"], target)

    # --- generations ------------------------------------------------------------------------

    def generate(
        self,
        adapter_id: str | None,
        prompt: str,
        *,
        wait: bool = True,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
        **params: Any,
    ) -> Generation:
        """Request images (adapter_id=None: the plain base model); by default wait for them.

        Keyword arguments are the request's fields: num_images, steps, guidance_scale, seed,
        width, height, scheduler, negative_prompt, compare_base (the base's images too, with the
        same seeds, marked `base`), webhook_url, webhook_events (a list of running, succeeded,
        failed, canceled). Raises JobFailed when the generation fails.
        """
        body = {"adapter_id": adapter_id, "prompt": prompt, **params}
        gen = cast(Generation, self._json("POST", "/v1/generations", json=body))
        return self.wait_generation(gen["id"], poll_s=poll_s, timeout_s=timeout_s) if wait else gen

    def get_generation(self, generation_id: str) -> Generation:
        return cast(Generation, self._json("GET", f"/v1/generations/{generation_id}"))

    def list_generations(
        self, *, status: str | None = None, limit: int = 20, offset: int = 0
    ) -> GenerationPage:
        query = _query(status=status, limit=limit, offset=offset)
        return cast(GenerationPage, self._json("GET", "/v1/generations", params=query))

    def delete_generation(self, generation_id: str) -> None:
        self._request("DELETE", f"/v1/generations/{generation_id}")

    def wait_generation(
        self, generation_id: str, *, poll_s: float = 0.5, timeout_s: float | None = None
    ) -> Generation:
        gen = _poll(lambda: self.get_generation(generation_id), poll_s, timeout_s, None)
        if gen["status"] != "succeeded":
            raise JobFailed(gen)
        return gen

    def download_images(self, generation: Generation | str, folder: str | Path) -> list[Path]:
        """Save a generation's PNGs as `<folder>/<generation id>-<index>.png`."""
        gen = self.get_generation(generation) if isinstance(generation, str) else generation
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        return [
            self._download(image["url"], out / f"{gen['id']}-{image['index']}.png")
            for image in gen["images"]
        ]

    def _download(self, url: str, target: Path) -> Path:
        # Written beside the target, then renamed: an interrupted download leaves no half file.
        partial = target.with_name(target.name + ".part")
        # A deployment with TUNEQDM_DOWNLOAD_REDIRECT answers 307 to its object store; httpx
        # drops the API key on that cross-origin hop (the URL's signature is the permission).
        with self._http.stream("GET", url, follow_redirects=True) as response:
            if response.is_error:
                response.read()
                _raise_for(response)
            with partial.open("wb") as f:
                for chunk in response.iter_bytes():
                    f.write(chunk)
        partial.replace(target)
        return target


def _raise_for(response: httpx.Response) -> None:
    if not response.is_error:
        return
    retry = response.headers.get("Retry-After", "")
    retry_after_s = int(retry) if retry.isdigit() else None
    problem: Problem | None = None
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("detail"), str):
            problem = cast(Problem, body)
    except ValueError:
        pass
    # Not a problem: a proxy or load balancer in front of the service answered.
    detail = problem["detail"] if problem else (response.text or response.reason_phrase)
    raise ApiError(response.status_code, detail, problem=problem, retry_after_s=retry_after_s)


def _query(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _poll(
    get: Callable[[], Any], poll_s: float, timeout_s: float | None, bar: ProgressBar | None
) -> Any:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        job = get()
        if bar is not None:
            bar.update(job)
        if job["status"] in FINAL:
            if bar is not None:
                bar.close()
            return job
        if deadline is not None and time.monotonic() > deadline:
            if bar is not None:
                bar.close()
            raise TimeoutError(f"{job['id']} still {job['status']} after {timeout_s} s")
        time.sleep(poll_s)
