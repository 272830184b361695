"""A plain-text progress bar for `Client.wait_finetune` (no tqdm dependency)."""

from __future__ import annotations

from typing import IO, Any

WIDTH = 30


class ProgressBar:
    """Redraws one line on a terminal; elsewhere (a log file, CI) prints a line per change."""

    def __init__(self, stream: IO[str], *, label: str) -> None:
        self.stream = stream
        self.label = label
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.last = ""

    def update(self, job: Any) -> None:
        line = render(job, label=self.label)
        if line == self.last:
            return
        self.last = line
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()


def render(job: Any, *, label: str) -> str:
    """`ft_… [#########.....................]  12/40  loss 0.1234  eta 9s  running`."""
    step, total = job["progress"]["step"], max(job["progress"]["total"], 1)
    filled = min(WIDTH, WIDTH * step // total)
    parts = [f"{label} [{'#' * filled}{'.' * (WIDTH - filled)}] {step:>{len(str(total))}}/{total}"]
    if job.get("loss") is not None:
        parts.append(f"loss {job['loss']:.4f}")
    if job.get("eta_seconds") is not None:
        parts.append(f"eta {job['eta_seconds']:.0f}s")
    parts.append(job["status"])
    return "  ".join(parts)
