"""The embedded mode (`make run` → `python -m worker.embedded`) with real processes, driven by
exactly the README's curl walk-through."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from app.settings import BUILTIN_MODEL
from tests.service.procs import ROOT, free_port, service_env
from tests.worker.conftest import photo_png


def walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->")[0]
    return block.split("```bash\n", 1)[1].split("```", 1)[0]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_readme_walkthrough_against_the_embedded_mode(tmp_path: Path) -> None:
    port = free_port()
    # Only what the shared test machine needs; everything else is the embedded default.
    env = service_env(torch_threads=1)
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
            url = re.search(r"^URL: (\S+)$", output, re.M)
            key = re.search(r"^API key: (tqk_\S+)$", output, re.M)
            assert url and key, output
            assert url.group(1) == f"http://127.0.0.1:{port}"
            # The shipped pretrained model serves; no random model is built.
            assert not (tmp_path / "var" / "models").exists()

            work = tmp_path / "walk"
            work.mkdir()
            for i in (1, 2, 3):
                (work / f"bag{i}.png").write_bytes(photo_png(i))
            start = time.perf_counter()
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", walkthrough()],
                cwd=work,
                env={**env, "API": url.group(1), "KEY": key.group(1)},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, (result.stdout, result.stderr, log_path.read_text())
            assert '"status":"succeeded"' in (work / "ft.json").read_text()
            image = Image.open(work / "bag-red.png")
            assert (image.format, image.size) == ("PNG", (32, 32))
            print(f"\nREADME walk-through: {time.perf_counter() - start:.1f} s")
        finally:
            launcher.send_signal(signal.SIGTERM)
            code = launcher.wait(timeout=60)
    assert code == 0, log_path.read_text()
    # Both children went with it.
    assert not _listening(port)
    assert "Warm shutdown" in log_path.read_text()
    assert f"base {BUILTIN_MODEL} " in log_path.read_text()
