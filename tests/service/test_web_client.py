"""The Python client and the web page, each against the real embedded service
(`python -m worker.embedded`: uvicorn + a Celery worker + SQLite, the built-in model, CPU);
then the web page against a deployment of both built-in models (uvicorn, one Celery worker per
base, PostgreSQL, Redis), where the user picks the FLUX-family base and trains and generates
on it.

The web page runs in Debian's chromium, headless, driven by Selenium through
/usr/bin/chromedriver; those tests skip where chromium is not installed (.ci/run installs it).
Set TEST_SCREENSHOTS_DIR to keep the page's screenshots (docs/web.md shows them).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.procs import (
    ROOT,
    create_key,
    free_port,
    service_env,
    start_api,
    start_worker,
    wait_for,
)
from tests.worker.conftest import photo_png
from tuneqdm_client import ApiError, Client

# The phases a running job's worker reports (docs/api.md "Phases").
RUNNING_PHASES = {
    "loading base",
    "preparing photos",
    "making class images",
    "training",
    "progress images",
    "generating",
    "saving",
}
# Records in the page every text a set of elements shows, so a test reads afterwards what the
# page showed while polling (no race with the poll's timer).
WATCH_TEXTS = """
window.seen = window.seen || {};
for (const [name, selector] of Object.entries(arguments[0])) {
  window.seen[name] = [];
  const texts = window.seen[name];
  const record = () => document.querySelectorAll(selector).forEach((e) => {
    if (e.textContent && texts.at(-1) !== e.textContent) texts.push(e.textContent);
  });
  new MutationObserver(record)
    .observe(document.body, { subtree: true, childList: true, characterData: true });
}
"""
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Small and quick on a CPU: the built-in model's native 32 px and a few steps.
STEPS = 30
PROMPTS = ["a photo of sks bag", "a photo of sks bag on a beach"]
SAMPLE_EVERY = 10


@dataclass
class Service:
    url: str
    key: str
    workdir: Path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("embedded")
    port = free_port()
    log_path = workdir / "embedded.log"
    with log_path.open("wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "worker.embedded", "--port", str(port)],
            cwd=workdir,
            # Progress images with few sampler steps: they show, they need not look good.
            env=service_env(torch_threads=1, sample_steps=3),
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
            yield Service(f"http://127.0.0.1:{port}", key.group(1), workdir)
        finally:
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(timeout=60)


def _photos(folder: Path) -> list[Path]:
    folder.mkdir()
    paths = []
    for i in (1, 2, 3):
        path = folder / f"bag{i}.png"
        path.write_bytes(photo_png(i))
        paths.append(path)
    (folder / "notes.txt").write_text("not a photo; the client skips it")
    return paths


def test_client_finetune_wait_generate_download_delete(service: Service, tmp_path: Path) -> None:
    _photos(tmp_path / "photos")
    bar = io.StringIO()
    with Client(service.url, service.key) as client:
        (base,) = client.bases()["data"]
        assert base["default"] and base["workers_up"] == 1 and base["sizes"]["default"] == 32
        job = client.create_finetune(
            tmp_path / "photos",
            "a photo of sks bag",
            name="bag",
            base=base["name"],
            steps=STEPS,
            resolution=32,
            validation_prompts=PROMPTS,
            sample_every=SAMPLE_EVERY,
        )
        assert (job["status"], job["num_images"], job["params"]["steps"]) == ("queued", 3, STEPS)
        assert job["base_model"] == base["name"]
        done = client.wait_finetune(job["id"], poll_s=0.5, timeout_s=300, stream=bar)
        assert done["status"] == "succeeded" and done["adapter_id"]
        # Not a terminal, so one line per change, the last one at 100 %.
        lines = bar.getvalue().splitlines()
        assert lines[-1].startswith(f"{job['id']} [{'#' * 30}] {STEPS}/{STEPS}")
        assert lines[-1].endswith("succeeded") and "loss " in lines[-1]

        # Progress images of the base (step 0), then every SAMPLE_EVERY steps, one per prompt,
        # and the event log.
        samples = client.samples(job["id"])
        assert [(x["step"], x["prompt"]) for x in samples["data"]] == [
            (step, prompt) for step in (0, 10, 20, 30) for prompt in PROMPTS
        ]
        saved_samples = client.download_samples(job["id"], tmp_path / "samples")
        assert len(saved_samples) == 8
        assert {Image.open(f).size for f in saved_samples} == {(32, 32)}
        page = client.events(job["id"], limit=2)
        events = page["data"]
        while page["has_more"]:
            page = client.events(job["id"], cursor=page["next_cursor"], limit=2)
            events += page["data"]
        kinds = [e["type"] for e in events]
        assert kinds[:2] == ["queued", "running"] and kinds[-1] == "succeeded", kinds
        assert [e["data"]["step"] for e in events if e["type"] == "samples"] == [0, 10, 20, 30]
        phases = [e["data"]["phase"] for e in events if e["type"] == "phase"]
        assert phases[-1] == "saving" and "training" in phases, phases
        assert "progress" in kinds
        assert client.events(job["id"], cursor=page["next_cursor"])["data"] == []

        adapter = client.get_adapter(done["adapter_id"])
        assert adapter["finetune_id"] == job["id"] and adapter["tokens"] == ["sks"]
        assert adapter["id"] in [a["id"] for a in client.list_adapters()["data"]]
        saved = client.download_adapter(adapter["id"], tmp_path)
        assert saved.stat().st_size == adapter["size_bytes"]

        gen = client.generate(
            adapter["id"], "a photo of sks bag", width=32, height=32, steps=10, seed=7, num_images=2
        )
        assert gen["status"] == "succeeded" and len(gen["images"]) == 2
        files = client.download_images(gen, tmp_path / "out")
        assert [Image.open(f).size for f in files] == [(32, 32), (32, 32)]
        listed = client.list_generations(status="succeeded")
        assert gen["id"] in [g["id"] for g in listed["data"]]

        # The base beside the adapter: its images with the same seeds, in the same batch, equal
        # to a plain base generation with those seeds (up to one level of float32 rounding).
        both = client.generate(
            adapter["id"], "a photo of sks bag", steps=10, seed=7, num_images=1, compare_base=True
        )
        assert [(i["index"], i["seed"], i["base"]) for i in both["images"]] == [
            (0, 7, False),
            (1, 7, True),
        ]
        plain = client.generate(None, "a photo of sks bag", steps=10, seed=7)
        assert [(i["seed"], i["base"]) for i in plain["images"]] == [(7, False)]
        _, base_png = client.download_images(both, tmp_path / "both")
        (plain_png,) = client.download_images(plain, tmp_path / "plain")
        pixels = [np.asarray(Image.open(f), dtype=np.int16) for f in (base_png, plain_png)]
        assert np.abs(pixels[0] - pixels[1]).max() <= 1
        assert both["phase"] is None and plain["phase"] is None

        # The API's own explanation travels in the exception.
        with pytest.raises(ApiError) as bad:
            client.generate(adapter["id"], "a photo of sks bag", width=12_000)
        assert bad.value.status_code == 422 and "width" in str(bad.value)
        assert bad.value.type == "urn:tuneqdm:problem:invalid-input"
        with pytest.raises(ApiError) as bad:
            client.create_finetune([tmp_path / "photos" / "notes.txt"], "a photo of sks bag")
        assert bad.value.status_code == 422
        assert "images[0] is not a readable PNG, JPEG or WebP image" in str(bad.value)

        client.delete_adapter(adapter["id"])
        with pytest.raises(ApiError) as gone:
            client.get_adapter(adapter["id"])
        assert gone.value.status_code == 404

    # The operator's view of the same run: /metrics over the embedded SQLite broker and registry.
    metrics = httpx.get(service.url + "/metrics").text
    assert "tuneqdm_broker_up 1.0" in metrics and "tuneqdm_registry_up 1.0" in metrics
    # One queue per kind and base, e.g. finetune.tuneqdm-fashion-sd-836ac38a (docs/workers.md).
    assert re.search(r'^tuneqdm_queue_messages\{queue="finetune\.[^"]+"\} 0\.0$', metrics, re.M)
    # Nothing left queued or running, and the embedded worker is up for its base; what the
    # jobs took is counted by the worker itself (its own port, docs/api.md "Metrics").
    assert re.search(r'^tuneqdm_jobs_active\{[^}]*status="queued"\} 0\.0$', metrics, re.M)
    assert re.search(r'^tuneqdm_workers_up\{base="[^"]+"\} 1\.0$', metrics, re.M)


# --- the web page ---------------------------------------------------------------------------


HAVE_CHROMIUM = os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)


def _browser() -> Any:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1100,1500",
    ):
        options.add_argument(flag)
    # Every console message, so the test sees any Content-Security-Policy violation.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = _browser()
    try:
        yield driver
    finally:
        driver.quit()


def _until(what: str, check: Callable[[], Any], timeout: float, driver: Any) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    logs = driver.get_log("browser") if hasattr(driver, "get_log") else []
    raise AssertionError(f"timed out waiting for {what}; browser log: {logs}")


def _screenshot(driver: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    keep = os.environ.get("TEST_SCREENSHOTS_DIR")
    if keep:
        shutil.copy(path, Path(keep) / path.name)


# Decided before any fixture runs, so a machine without chromium does not start the service
# for nothing.
@pytest.mark.skipif(
    not HAVE_CHROMIUM, reason="chromium and chromium-driver are not installed (apt-get install)"
)
def test_web_page_happy_path_and_bad_upload(service: Service, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    def find(element_id: str) -> Any:
        return browser.find_element(By.ID, element_id)

    def visible(element_id: str) -> bool:
        return bool(find(element_id).is_displayed())

    photos = _photos(tmp_path / "photos")
    browser.get(service.url + "/")
    assert browser.title == "tuneqdm" and not visible("app")
    # The page's icon is its own small SVG, served by the API (no request leaves the origin).
    icon = browser.find_element(By.CSS_SELECTOR, 'link[rel="icon"]').get_attribute("href")
    assert icon == service.url + "/favicon.svg"
    served = httpx.get(icon)
    assert served.status_code == 200 and served.headers["content-type"] == "image/svg+xml"
    assert served.text.startswith("<svg") and "http" not in served.text.replace(
        "http://www.w3.org/2000/svg", ""
    )
    # Where a key comes from, in the README's words.
    help_text = find("key-help").text
    assert "make run" in help_text and "tuneqdm-admin keys create --tenant" in help_text

    # A wrong key: the API's 401 message, and the rest of the page stays hidden.
    find("api-key").send_keys("tqk_wrong")
    find("save-key").click()
    _until("the 401 message", lambda: "API key" in find("key-status").text, 20, browser)
    assert not visible("app")
    find("api-key").clear()
    find("api-key").send_keys(service.key)
    find("save-key").click()
    _until("the app", lambda: visible("app"), 20, browser)
    assert browser.execute_script("return sessionStorage.getItem('tuneqdm.key')") == service.key

    # A bad upload: the page shows the API's own detail, word for word.
    fake = tmp_path / "fake.png"
    fake.write_text("this is not an image")
    find("photos").send_keys(str(fake))
    find("start-finetune").click()
    _until("the upload error", lambda: visible("finetune-error"), 20, browser)
    api_answer = httpx.post(
        service.url + "/v1/finetunes",
        headers={"Authorization": f"Bearer {service.key}"},
        files=[("images", ("fake.png", fake.read_bytes(), "image/png"))],
        data={"instance_prompt": "a photo of sks bag", "params": '{"method":"tuneqdm"}'},
    )
    assert api_answer.status_code == 422
    assert find("finetune-error").text == api_answer.json()["detail"]
    _screenshot(browser, tmp_path, "web-bad-upload")

    # The bases this service serves, from GET /v1/bases: here the default one only.
    bases = browser.execute_script(
        "return [...document.querySelectorAll('#base option')].map((o) => [o.value, o.text])"
    )
    assert bases == [["", "tuneqdm/fashion-sd (default), sd, 4-bit, 32 px"]], bases
    # The size fields take their range and default from GET /v1/bases, not from the page.
    (listed,) = httpx.get(
        service.url + "/v1/bases", headers={"Authorization": f"Bearer {service.key}"}
    ).json()["data"]
    sizes = listed["sizes"]
    for field in ("resolution", "gen-size"):
        assert find(field).get_attribute("min") == str(sizes["min"]), field
        assert find(field).get_attribute("max") == str(sizes["max"]), field
        assert find(field).get_attribute("placeholder") == f"{sizes['default']} (native)", field
    assert find("steps").get_attribute("placeholder") == f"{listed['finetune']['steps']} (default)"

    # The happy path: photos with previews, a few steps at 32 px, watched to success.
    find("photos").clear()
    find("photos").send_keys("\n".join(str(p) for p in photos))
    previews = lambda: len(find("previews").find_elements(By.TAG_NAME, "img"))  # noqa: E731
    _until("3 previews", lambda: previews() == 3, 10, browser)
    find("ft-name").send_keys("bag")
    find("steps").send_keys(str(STEPS))
    find("resolution").send_keys("32")
    find("validation-prompts").send_keys("\n".join(PROMPTS))
    find("sample-every").send_keys(str(SAMPLE_EVERY))
    # What the card's phase and the table's rows show while the job runs.
    browser.execute_script(
        WATCH_TEXTS, {"phase": "#job-phase", "rows": "#finetunes tr td:nth-child(2)"}
    )
    find("start-finetune").click()
    _until("the job card", lambda: visible("job"), 20, browser)
    assert not visible("finetune-error")
    _until("success", lambda: find("job-status").text == "succeeded", 300, browser)
    seen = browser.execute_script("return window.seen")
    # The card said what the worker was doing; the table moved with it while it ran.
    phases = {text.split(":")[0] for text in seen["phase"]}
    assert phases & RUNNING_PHASES and phases <= RUNNING_PHASES | {"waiting for a worker"}, seen
    assert "running" in seen["rows"], seen
    assert find("job-phase").text == ""  # a final job does nothing
    row = browser.find_element(By.CSS_SELECTOR, "#finetunes tr")
    assert row.find_element(By.CSS_SELECTOR, "td.progress").text == f"{STEPS}/{STEPS}"
    points = browser.execute_script("return state.losses")
    assert len(points) >= 1 and all(isinstance(loss, float) for _, loss in points)
    # The smoothed line: the exponential moving average of those losses, drawn over them.
    smoothed = browser.execute_script("return state.smoothed")
    average = points[0][1]
    expected_line = []
    for step, loss in points:
        average = 0.2 * loss + 0.8 * average
        expected_line.append([step, average])
    expected_line[0] = points[0]
    assert [s for s, _ in smoothed] == [s for s, _ in points]
    assert all(abs(a - b) < 1e-9 for (_, a), (_, b) in zip(smoothed, expected_line, strict=True))
    red = browser.execute_script(
        "const c = document.getElementById('loss-plot');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < d.length; i += 4)"
        " if (d[i] === 220 && d[i + 1] === 38 && d[i + 2] === 38) n++; return n"
    )
    assert red > 20, red
    # From the event log: in step order, up to the last step.
    steps = [step for step, _ in points]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    assert find("job-progress").get_attribute("value") == str(STEPS)
    # The progress images: one column per sampled step, one decoded image per prompt.
    columns = lambda: browser.execute_script(  # noqa: E731
        "return [...document.querySelectorAll('#samples figure.step')].map((f) =>"
        " [Number(f.dataset.step), [...f.querySelectorAll('img')]"
        ".filter((i) => i.complete && i.naturalWidth === 32).length])"
    )
    expected = [[step, len(PROMPTS)] for step in (0, 10, 20, 30)]
    _until("the progress images", lambda: columns() == expected, 30, browser)
    assert visible("samples-block") and PROMPTS[1] in find("sample-prompts").text
    assert find("samples").find_element(By.TAG_NAME, "figcaption").text == "step 0 (base)"
    # The job's adapter is listed and chosen for the next generation.
    adapter_id = _until(
        "the new adapter", lambda: find("gen-adapter").get_attribute("value"), 20, browser
    )
    assert browser.find_elements(By.CSS_SELECTOR, f'tr[data-adapter="{adapter_id}"]')
    _screenshot(browser, tmp_path, "web-finetune")

    find("gen-prompt").clear()
    find("gen-prompt").send_keys("a photo of sks bag on a red background")
    find("gen-steps").send_keys("10")
    find("gen-size").send_keys("32")
    find("gen-seed").send_keys("7")
    find("gen-compare").click()  # the base's image beside the adapter's
    browser.execute_script(WATCH_TEXTS, {"gen_phase": "#generate-phase"})
    find("generate").click()
    images = _until(
        "the adapter's and the base's image",
        lambda: browser.execute_script(
            "const p = document.querySelector('figure.pair[data-seed=\"7\"]');"
            "const i = p ? [...p.querySelectorAll('img.generated')] : [];"
            "return i.length === 2 && i.every((x) => x.complete && x.naturalWidth)"
            " ? i.map((x) => [x.classList.contains('base'), x.naturalWidth, x.naturalHeight])"
            " : null"
        ),
        120,
        browser,
    )
    assert images == [[False, 32, 32], [True, 32, 32]]
    assert find("generate-status").text.endswith("succeeded")
    # Its phase while it waited (the POST's answer) and, once final, none.
    gen_phases = browser.execute_script("return window.seen.gen_phase")
    assert gen_phases[0].startswith("waiting for a worker"), gen_phases
    assert {p.split(":")[0] for p in gen_phases} <= RUNNING_PHASES | {"waiting for a worker"}
    assert find("generate-phase").text == ""
    browser.execute_script("document.getElementById('adapters').scrollIntoView()")
    _screenshot(browser, tmp_path, "web-generate")
    # All of it under the page's Content-Security-Policy, without one violation.
    assert "default-src 'none'" in httpx.get(service.url + "/").headers["content-security-policy"]
    console = [entry["message"] for entry in browser.get_log("browser")]
    assert not [m for m in console if "Content Security Policy" in m], console
    assert not [m for m in console if "favicon" in m], console

    # A request that fails takes the previous one's status line and images away.
    find("gen-compare").click()
    find("gen-steps").clear()
    find("gen-steps").send_keys("1000")
    find("generate").click()
    _until("the generation error", lambda: visible("generate-error"), 20, browser)
    assert "steps=1000" in find("generate-error").text
    assert find("generate-status").text == ""
    assert not browser.find_elements(By.CSS_SELECTOR, "#gen-images img")

    # The delete prompts name what goes and what stays; the fine-tune's is dismissed.
    if visible("delete-job"):
        find("delete-job").click()
        prompt = browser.switch_to.alert.text
        browser.switch_to.alert.dismiss()
        assert '"bag"' in prompt and f"Kept: its adapter {adapter_id}" in prompt, prompt
        assert "photos, checkpoints, progress images and event log" in prompt, prompt
    # Delete the adapter from its row (the page asks first).
    browser.find_element(By.CSS_SELECTOR, f'button[data-delete="{adapter_id}"]').click()
    prompt = browser.switch_to.alert.text
    assert prompt.startswith(f'Delete the adapter "bag" ({adapter_id})?'), prompt
    assert "Deleted: the adapter file and its exports" in prompt, prompt
    assert "Kept: the fine-tune that trained it" in prompt, prompt
    browser.switch_to.alert.accept()
    _until(
        "the row to go",
        lambda: not browser.find_elements(By.CSS_SELECTOR, f'tr[data-adapter="{adapter_id}"]'),
        20,
        browser,
    )
    gone = httpx.get(
        f"{service.url}/v1/adapters/{adapter_id}",
        headers={"Authorization": f"Bearer {service.key}"},
    )
    assert gone.status_code == 404
    # Deleting fine-tunes shows only where the service has DELETE /v1/finetunes/{id}.
    paths = httpx.get(service.url + "/openapi.json").json()["paths"]
    assert visible("delete-job") == ("delete" in paths["/v1/finetunes/{finetune_id}"])


# --- the web page on two bases ----------------------------------------------------------------

SD_BASE, FLUX_BASE = "tuneqdm/fashion-sd", "tuneqdm/fashion-flux"
FLUX_STEPS = 10


@pytest.mark.slow  # three service processes and a browser (make test-slow)
@pytest.mark.skipif(
    not HAVE_CHROMIUM, reason="chromium and chromium-driver are not installed (apt-get install)"
)
def test_web_page_picks_the_flux_base_trains_and_generates(
    pg_url: str,
    redis_url: str,
    logs: Path,
    quant_cache: Path,
    browser: Any,
    tmp_path: Path,
) -> None:
    """Both built-in models served, one worker each: the page's base selector lists both
    (from GET /v1/bases), and a fine-tune of the FLUX one, chosen there, trains on its worker;
    the generation with its adapter takes the base's classifier-free rules (the default steps
    and scale, a negative prompt) and its image comes back."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    def find(element_id: str) -> Any:
        return browser.find_element(By.ID, element_id)

    common: dict[str, Any] = {
        "database_url": pg_url,
        "broker_url": redis_url,
        "data_dir": tmp_path / "data",
        "quant_cache_dir": quant_cache,
        "torch_threads": 1,
        "heartbeat_s": 1,
    }
    env_sd = service_env(**common, model=ROOT / "models" / "fashion-sd", base_model=SD_BASE)
    env_flux = service_env(**common, model=ROOT / "models" / "fashion-flux", base_model=FLUX_BASE)
    for env in (env_sd, env_flux):
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # two workers and the browser share the cores
    key = create_key(env_sd, "web")["api key"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = [
        start_api(env_sd, logs, port),  # the default base: fashion-sd
        start_worker(env_sd, logs, "worker-sd"),
        worker_flux := start_worker(env_flux, logs, "worker-flux"),
    ]
    try:
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

        def both_up() -> bool:
            try:
                listed = api.get("/v1/bases").raise_for_status().json()["data"]
            except httpx.TransportError:
                return False
            return {b["name"]: b["workers_up"] for b in listed} == {SD_BASE: 1, FLUX_BASE: 1}

        wait_for("the API and both workers", both_up, 180, procs)
        flux = api.get(f"/v1/bases/{FLUX_BASE}").json()
        assert (flux["family"], flux["generation"]["guidance"]) == ("flux", "cfg")

        browser.get(url + "/")
        find("api-key").send_keys(key)
        find("save-key").click()
        _until("the app", lambda: find("app").is_displayed(), 20, browser)
        options = lambda: browser.execute_script(  # noqa: E731
            "return [...document.querySelectorAll('#base option')].map((o) => [o.value, o.text])"
        )
        _until("both bases", lambda: len(options()) == 2, 20, browser)
        assert options() == [
            ["", f"{SD_BASE} (default), sd, 4-bit, 32 px"],
            [FLUX_BASE, f"{FLUX_BASE}, flux, 4-bit, 32 px"],
        ]
        # Picking the FLUX base brings its own defaults into the form.
        Select(find("base")).select_by_value(FLUX_BASE)
        assert find("base-info").text.startswith(f"{FLUX_BASE}: family flux")
        assert flux["sizes"] == {"default": 32, "min": 16, "max": 64}
        assert find("resolution").get_attribute("min") == "16"
        default_steps = flux["finetune"]["steps"]
        assert find("steps").get_attribute("placeholder") == f"{default_steps} (default)"

        find("photos").send_keys("\n".join(str(p) for p in _photos(tmp_path / "photos")))
        find("ft-name").send_keys("flux bag")
        find("steps").send_keys(str(FLUX_STEPS))
        find("start-finetune").click()  # at the base's own side, 32 px
        _until("success", lambda: find("job-status").text == "succeeded", 300, browser)
        (job,) = api.get("/v1/finetunes").json()["data"]
        assert (job["base_model"], job["params"]["resolution"]) == (FLUX_BASE, 32)
        assert job["id"] in worker_flux.log()  # the FLUX worker trained it
        adapter_id = _until(
            "the new adapter", lambda: find("gen-adapter").get_attribute("value"), 20, browser
        )
        assert adapter_id == job["adapter_id"]
        # The generation form follows the adapter's base: classifier-free, negative prompt on.
        info = find("gen-base-info")
        assert info.get_attribute("data-base") == FLUX_BASE and "guidance cfg" in info.text
        assert find("gen-negative").is_enabled()
        assert find("gen-steps").get_attribute("placeholder") == "28 (default)"
        # JavaScript writes 4.0 as 4.
        assert find("gen-guidance").get_attribute("placeholder") == "4 (default)"

        find("gen-prompt").clear()
        find("gen-prompt").send_keys("a photo of sks bag on a red background")
        find("gen-negative").send_keys("blue")
        find("gen-seed").send_keys("7")
        find("generate").click()
        size = _until(
            "the generated image",
            lambda: browser.execute_script(
                "const i = document.querySelector('#gen-images img.generated');"
                "return i && i.complete && i.naturalWidth ? [i.naturalWidth, i.naturalHeight]"
                " : null"
            ),
            180,
            browser,
        )
        assert size == [32, 32] and find("generate-status").text.endswith("succeeded")
        (gen,) = api.get("/v1/generations").json()["data"]
        assert (gen["base_model"], gen["adapter_id"], gen["negative_prompt"]) == (
            FLUX_BASE,
            adapter_id,
            "blue",
        )
        # The base's defaults, its own side among them.
        assert (gen["steps"], gen["guidance_scale"], gen["width"]) == (28, 4.0, 32)
        _screenshot(browser, tmp_path, "web-flux")
        console = [entry["message"] for entry in browser.get_log("browser")]
        assert not [m for m in console if "Content Security Policy" in m], console
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.stop()
