"""The load test (benchmarks/load.py) run very briefly against real processes: it prints its
table and loses no job. Timings are not checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.load import ENDPOINTS, Job, Run, report, table
from tests.api.conftest import PG_SERVER, PgDatabases

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_a_short_load_run_prints_its_table_and_loses_nothing(
    tmp_path: Path, tiny_model_dir: Path, quant_cache: Path
) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    admin = PgDatabases()  # skips when PostgreSQL is not reachable
    server = f"postgresql+psycopg://{admin.user}@{PG_SERVER}/postgres"
    admin.drop_all()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["--duration", "3", "--drain", "90", "--workers", "1", "--postgres", server]
    # The session's tiny model and its quantized cache, one worker, no warm-up: the smoke test
    # is about the table and the count of lost jobs, not the numbers, and a worker's first model
    # load is most of its time (tests/service/test_gpus.py runs two workers).
    args += ["--model", str(tiny_model_dir), "--quant-cache", str(quant_cache), "--no-warm-up"]
    done = subprocess.run(
        [sys.executable, "benchmarks/load.py", *args, "--json", str(tmp_path / "load.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    print(done.stdout)
    result = json.loads((tmp_path / "load.json").read_text())
    assert result["lost"] == 0 and result["failed"] == 0
    for kind in ("finetune", "generation"):
        k = result["kinds"][kind]
        assert k["submitted"] > 0 and k["succeeded"] == k["submitted"], (kind, k)
        assert f"| {kind} | {k['submitted']} | {k['succeeded']} | 0 | 0 |" in done.stdout
    assert set(result["endpoints"]) == set(ENDPOINTS)
    assert all(e["count"] > 0 and e["non_2xx"] == 0 for e in result["endpoints"].values())
    assert "jobs lost: 0" in done.stdout


def test_a_job_not_final_or_without_its_files_counts_as_lost() -> None:
    run = Run()
    run.jobs = [
        Job("finetune", "t", "ft_1", 0.0, final=2.0, status="succeeded", files_ok=True),
        Job("finetune", "t", "ft_2", 0.0),  # never final within the drain
        Job("generation", "t", "gen_1", 0.0, final=1.0, status="succeeded", files_ok=False),
        Job("generation", "t", "gen_2", 0.0, final=1.0, status="failed"),
    ]
    meta = {"duration_s": 1, "tenants": 1, "workers": 1, "storage": "local"}
    result = report(run, meta)
    assert result["lost"] == 2 and result["failed"] == 1
    assert result["kinds"]["finetune"]["e2e_p50_s"] == 2.0
    assert "jobs lost: 2" in table(result)
