"""The client's pure parts: the progress line, its terminal and log modes, error text.

Its calls against the real service are in tests/service/test_web_client.py."""

from __future__ import annotations

import io
from typing import Any

from tuneqdm_client import ApiError, Problem
from tuneqdm_client.client import image_files
from tuneqdm_client.progress import ProgressBar, render


def _job(step: int, status: str = "running", loss: float | None = 0.25) -> dict[str, Any]:
    eta = 3.0 if status == "running" else None
    return {
        "progress": {"step": step, "total": 40},
        "loss": loss,
        "eta_seconds": eta,
        "status": status,
    }


def test_render_fills_the_bar_in_proportion() -> None:
    assert render(_job(0, "queued", None), label="ft_1") == f"ft_1 [{'.' * 30}]  0/40  queued"
    line = render(_job(20), label="ft_1")
    assert line == f"ft_1 [{'#' * 15}{'.' * 15}] 20/40  loss 0.2500  eta 3s  running"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_redraws_one_line_and_logs_get_a_line_per_change() -> None:
    tty, log = _Terminal(), io.StringIO()
    for stream in (tty, log):
        bar = ProgressBar(stream, label="ft_1")
        for job in (_job(1), _job(1), _job(2), _job(40, "succeeded")):
            bar.update(job)
        bar.close()
    assert tty.getvalue().count("\r") == 3 and tty.getvalue().endswith("succeeded\x1b[K\n")
    assert len(log.getvalue().splitlines()) == 3  # the repeated state is not printed twice


def test_api_error_reads_like_the_api() -> None:
    assert (
        str(ApiError(409, "job ft_1 has already finished")) == "409: job ft_1 has already finished"
    )
    problem: Problem = {
        "type": "urn:tuneqdm:problem:invalid-input",
        "title": "Unprocessable Content",
        "status": 422,
        "detail": "width: Input should be ≤ 8192",
        "errors": [{"field": "width", "message": "Input should be ≤ 8192"}],
    }
    err = ApiError(422, problem["detail"], problem=problem)
    assert str(err) == "422: width: Input should be ≤ 8192"
    assert err.errors == [{"field": "width", "message": "Input should be ≤ 8192"}]
    assert err.type == "urn:tuneqdm:problem:invalid-input"


def test_a_folder_gives_its_photos_sorted(tmp_path: Any) -> None:
    for name in ("b.JPG", "a.png", "notes.txt", "c.webp"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in image_files(tmp_path)] == ["a.png", "b.JPG", "c.webp"]
    assert image_files(tmp_path / "a.png") == [tmp_path / "a.png"]


def test_async_client_has_every_method_of_client() -> None:
    from tuneqdm_client import AsyncClient, Client

    public = {n for n in vars(Client) if not n.startswith("_") and callable(getattr(Client, n))}
    asynced = {n for n in vars(AsyncClient) if not n.startswith("_")}
    assert public - {"close"} <= asynced
