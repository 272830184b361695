"""Stopping work inside a UNet call: a check in front of every UNet block.

A training step or a denoising step at a large size can take minutes on a CPU; a check between
steps would let a canceled (or timed-out) job hold its worker that long. ``cancel_checks``
registers a forward pre-hook on each down, mid and up block that calls ``should_cancel()``
and raises :class:`Canceled` when it returns true, so work stops within one block. The hooks
run a dozen times per UNet call, so ``should_cancel`` must be cheap (read a flag or a clock,
never a database); the caller sets the flag from elsewhere (a worker's heartbeat thread).
With gradient checkpointing the hooks also run in the recomputation during backward, which
stops a long backward pass the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class Canceled(Exception):
    """``should_cancel()`` returned true; the work was stopped where it was."""


def _blocks(unet: Any) -> list[Any]:
    blocks = [*getattr(unet, "down_blocks", []), *getattr(unet, "up_blocks", [])]
    # Transformers (FLUX, SD3): every double- and single-stream block.
    blocks += [
        *getattr(unet, "transformer_blocks", []),
        *getattr(unet, "single_transformer_blocks", []),
    ]
    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        blocks.append(mid)
    # A model without diffusers' block lists still gets one check per call.
    return blocks or [unet]


@contextmanager
def cancel_checks(unet: Any, should_cancel: Callable[[], bool] | None) -> Iterator[None]:
    """Within the block, every UNet block first asks ``should_cancel()`` (None: no checks)."""
    if should_cancel is None:
        yield
        return

    def check(_module: Any, _args: Any) -> None:
        if should_cancel():
            raise Canceled("canceled during a UNet call")

    handles = [block.register_forward_pre_hook(check) for block in _blocks(unet)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
