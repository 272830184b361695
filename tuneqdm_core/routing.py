"""Per-sample routing: which adapter and which timestep interval each sample of a batch uses.

A :class:`Route` is built once per model call from the timesteps (and adapter slots) of the
batch. It holds, per layer, a table of scale rows ``[R, C]`` and, per sample, the row to use;
every layer then gathers its rows with one ``index_select`` — no host-device synchronisation
per layer. Two sources of rows:

- a list of :class:`~tuneqdm_core.adapter.Adapter` (training, or a few adapters in hand): the
  rows that the batch uses are stacked once per call, so intervals nobody used get no gradient;
  one host synchronisation per call when the timesteps live on an accelerator;
- a :class:`ScaleBank` (serving): fixed slots in one contiguous buffer, filled by copying an
  adapter in; routing is all on the device.

A route is tied to what it was built for, and :func:`set_route` checks both against the model:
the quantized base (an adapter made for another base of the same layer layout would give
wrong output without any error, so the base's fingerprint must match), and the timesteps
(the model's forward reads the timesteps it is called with and refuses a call at other
timesteps than the route's: a route picks each sample's interval from them). That check
reads the call's timesteps on the host: free on a CPU or when the model is called with the
very tensor the route was built from, one synchronisation per call otherwise. diffusers' UNets
are called with the training timesteps and are checked as they are; any other model (one
called with timesteps on another scale, like FLUX's transformer with t/1000) is checked once
``quant_state(model).call_timesteps`` is set to a function of the call's ``(args, kwargs)``
that returns them in training-timestep units.

Set a route with ``with routed(model, route):`` and run the backward inside the block:
gradient checkpointing recomputes layers during backward and reads the route again, so on a
model with checkpointing on, :func:`routed` (and :func:`set_route`) refuse to replace a route
while an autograd graph that read it has not been backpropagated (or freed), and a backward
that would recompute with a route cleared under it raises instead of giving silently wrong
gradients. Prior-preservation batches should therefore go through the model as one batch
(which is also faster).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tuneqdm_core.adapter import Adapter
from tuneqdm_core.model import Layout, QuantState, quant_state

Timesteps = torch.Tensor | int | float | Sequence[int] | Sequence[float]
Slots = torch.Tensor | int | Sequence[int]


class _ReadGuard:
    """One autograd graph that read a route: counted on the route until that graph's backward
    passes through it, or the graph is freed without one."""

    __slots__ = ("route",)

    def __init__(self, route: Route) -> None:
        self.route: Route | None = route
        route.live_graphs += 1

    def release(self) -> None:
        if self.route is not None:
            self.route.live_graphs -= 1
            self.route = None

    def __del__(self) -> None:
        self.release()


class _MarkRead(torch.autograd.Function):
    """Identity on a looked-up scale row; its graph node holds a :class:`_ReadGuard`."""

    @staticmethod
    def forward(ctx: Any, s: torch.Tensor, route: Route) -> torch.Tensor:
        ctx.guard = _ReadGuard(route)
        return s.view_as(s)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.guard.release()
        return grad, None


@dataclass(eq=False)
class Route:
    """Per-layer scale tables and the row each sample reads.

    ``rows`` is ``None`` when the whole batch reads one row, ``row`` (a *uniform* route: the
    layers then fold the scales into the weight, tuneqdm_core/layers.py), else a ``[B]`` (or
    ``[1]``) long tensor on the tables' device. ``live_graphs`` counts autograd graphs that
    read the route on a model with gradient checkpointing and still need it for their
    backward. ``ratio_parts`` (uniform routes of a :class:`ScaleBank`): each layer's
    ``s_out / s0`` for that row, computed for all layers in one operation per call.
    ``base_fingerprint``/``layout``/``bits``: the quantized base the scales were made for,
    and ``timesteps`` (``[B]`` or ``[1]``) the timesteps the rows were chosen for; both are
    checked against the model (module docstring), ``None`` skips a check."""

    out_parts: Sequence[torch.Tensor]
    in_parts: Sequence[torch.Tensor] | None
    rows: torch.Tensor | None
    row: int = 0
    ratio_parts: Sequence[torch.Tensor] | None = None
    base_fingerprint: str | None = None
    layout: Layout | None = None
    bits: int | None = None
    timesteps: torch.Tensor | None = None
    live_graphs: int = field(default=0, init=False, repr=False)

    def ratio(self, index: int) -> torch.Tensor | None:
        """Layer ``index``'s precomputed ``s_out / s0`` (``[O]``), where the route has them."""
        return None if self.ratio_parts is None else self.ratio_parts[index]

    def lookup(
        self, index: int, batch: int, *, track: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer ``index``'s scale rows for a batch of ``batch``; ``track`` counts the read in
        ``live_graphs`` while the graph it goes into is alive (gradient checkpointing)."""
        s_out, s_in = self._rows(index, batch)
        if track and torch.is_grad_enabled() and s_out.requires_grad:
            s_out = _MarkRead.apply(s_out, self)
        return s_out, s_in

    def _rows(self, index: int, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        s_out = self.out_parts[index]
        s_in = None if self.in_parts is None else self.in_parts[index]
        if self.rows is None:
            row = slice(self.row, self.row + 1)
            return s_out[row], None if s_in is None else s_in[row]
        if self.rows.shape[0] not in (1, batch):
            raise ValueError(
                f"the route names {self.rows.shape[0]} samples but a layer got a batch of "
                f"{batch}; pass one timestep/slot per sample (repeat them for "
                "classifier-free guidance)"
            )
        s_out = s_out.index_select(0, self.rows)
        return s_out, None if s_in is None else s_in.index_select(0, self.rows)


def _as_batch(value: Timesteps | Slots, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=dtype) if not torch.is_tensor(value) else value
    return tensor.reshape(-1)


def _pair(timesteps: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast a single timestep or slot to the other's batch size."""
    if timesteps.shape[0] != slots.shape[0] and 1 not in (timesteps.shape[0], slots.shape[0]):
        raise ValueError(
            f"got {timesteps.shape[0]} timesteps but {slots.shape[0]} slots; give one per "
            "sample, or a single value for the whole batch"
        )
    size = max(timesteps.shape[0], slots.shape[0])
    return timesteps.expand(size), slots.expand(size)


def route_adapters(
    adapters: Sequence[Adapter], timesteps: Timesteps, slots: Slots | None = None
) -> Route:
    """A route over ``adapters`` (``slots[b]`` indexes the list; default all 0)."""
    if not adapters:
        raise ValueError("route_adapters needs at least one adapter")
    first = adapters[0]
    layout = first.layout
    for slot, adapter in enumerate(adapters[1:], start=1):
        if adapter.layout != layout or adapter.base_fingerprint != first.base_fingerprint:
            raise ValueError(
                "adapters in one route must be made for the same quantized base: "
                + _base_difference(
                    (adapter.base_fingerprint, adapter.layout, adapter.bits),
                    (first.base_fingerprint, layout, first.bits),
                    f"adapter {slot}",
                    "adapter 0",
                )
            )
    # Row assignment is host work on a few numbers: one transfer per call, never per layer.
    t_host = _as_batch(timesteps, torch.float64).detach().cpu()
    s_host = _as_batch(0 if slots is None else slots, torch.long).detach().cpu()
    t_host, s_host = _pair(t_host, s_host)
    keys: list[tuple[int, int]] = []
    for t, slot in zip(t_host.tolist(), s_host.tolist(), strict=True):
        if not 0 <= slot < len(adapters):
            raise ValueError(f"slot {slot} is outside [0, {len(adapters)})")
        keys.append((slot, adapters[slot].config.interval_of(t)))
    used = sorted(set(keys))
    device = adapters[0].s_out[0].device

    out_table = torch.stack([adapters[a].s_out[k] for a, k in used])
    in_table = None
    if any(adapters[a].has_s_in for a, _ in used):
        ones = torch.ones(layout.total_in, device=device, dtype=out_table.dtype)
        in_table = torch.stack(
            [adapters[a].s_in[k] if adapters[a].has_s_in else ones for a, k in used]
        )
    rows = None
    if len(used) > 1:
        position = {key: i for i, key in enumerate(used)}
        rows = torch.tensor([position[key] for key in keys], device=device)
    return Route(
        out_parts=torch.split(out_table, layout.out_sizes, dim=1),
        in_parts=None if in_table is None else torch.split(in_table, layout.in_sizes, dim=1),
        rows=rows,
        base_fingerprint=first.base_fingerprint,
        layout=layout,
        bits=first.bits,
        timesteps=t_host,
    )


class ScaleBank(nn.Module):
    """Serving slots: ``slots × max_intervals`` rows of scales in two contiguous buffers.

    Slot values start as the base model (``s_out = s0``, ``s_in = 1``, one interval), so an
    empty slot serves the plain quantized base. :meth:`load` copies an adapter into a slot —
    a handful of vector copies, no model weight is touched.
    """

    base_s_out: torch.Tensor
    s_out: torch.Tensor
    s_in: torch.Tensor
    intervals: torch.Tensor

    def __init__(
        self, model: nn.Module, slots: int, max_intervals: int = 2, num_train_timesteps: int = 1000
    ) -> None:
        super().__init__()
        if slots < 1 or max_intervals < 1:
            raise ValueError(
                f"need slots >= 1 and max_intervals >= 1, got {slots}, {max_intervals}"
            )
        state = quant_state(model)
        self.layout = state.layout
        self.base_fingerprint = state.fingerprint
        self.bits = state.config.bits
        self.num_train_timesteps = num_train_timesteps
        self.register_buffer("base_s_out", state.base_scales().clone(), persistent=False)
        self.register_buffer(
            "s_out", self.base_s_out.expand(slots, max_intervals, -1).clone(), persistent=False
        )
        self.register_buffer(
            "s_in",
            torch.ones(slots, max_intervals, self.layout.total_in, device=self.base_s_out.device),
            persistent=False,
        )
        self.register_buffer(
            "intervals",
            torch.ones(slots, dtype=torch.long, device=self.base_s_out.device),
            persistent=False,
        )
        self._parts: tuple[int, Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None
        # Host copies of what routing reads: ``intervals`` per slot, and per row the layers'
        # s_out / s0 (keyed by the buffer they were computed from).
        self._host_intervals = [1] * slots
        self._ratio_cache: dict[int, tuple[int, Sequence[torch.Tensor]]] = {}

    @property
    def slots(self) -> int:
        return self.s_out.shape[0]

    @property
    def max_intervals(self) -> int:
        return self.s_out.shape[1]

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside [0, {self.slots})")

    def load(self, slot: int, adapter: Adapter) -> None:
        """Put ``adapter`` in ``slot`` (copies ``intervals × (Σout + Σin)`` values)."""
        self._check_slot(slot)
        if adapter.base_fingerprint != self.base_fingerprint or adapter.layout != self.layout:
            raise ValueError(
                "adapter was made for another quantized base (fingerprint "
                f"{adapter.base_fingerprint[:12]}…, this base {self.base_fingerprint[:12]}…)"
            )
        n = adapter.config.intervals
        if n > self.max_intervals:
            raise ValueError(
                f"adapter has {n} intervals; this bank holds at most {self.max_intervals}"
            )
        if adapter.config.num_train_timesteps != self.num_train_timesteps:
            raise ValueError(
                f"adapter splits {adapter.config.num_train_timesteps} timesteps, "
                f"the bank {self.num_train_timesteps}"
            )
        with torch.no_grad():
            for k in range(n):
                self.s_out[slot, k].copy_(adapter.s_out[k], non_blocking=True)
                if adapter.has_s_in:
                    self.s_in[slot, k].copy_(adapter.s_in[k], non_blocking=True)
                else:
                    self.s_in[slot, k].fill_(1.0)
            self.intervals[slot] = n
        self._host_intervals[slot] = n
        self._ratio_cache.clear()

    def reset(self, slot: int) -> None:
        """Make ``slot`` serve the plain quantized base again."""
        self._check_slot(slot)
        with torch.no_grad():
            self.s_out[slot].copy_(self.base_s_out.expand_as(self.s_out[slot]))
            self.s_in[slot].fill_(1.0)
            self.intervals[slot] = 1
        self._host_intervals[slot] = 1
        self._ratio_cache.clear()

    def _split(self) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]:
        # Per-layer views into the buffers; rebuilt only when .to() replaced the buffers.
        key = self.s_out.data_ptr()
        if self._parts is None or self._parts[0] != key:
            rows = self.slots * self.max_intervals
            outs = torch.split(self.s_out.view(rows, -1), self.layout.out_sizes, dim=1)
            ins = torch.split(self.s_in.view(rows, -1), self.layout.in_sizes, dim=1)
            self._parts = (key, outs, ins)
        return self._parts[1], self._parts[2]

    def route(self, timesteps: Timesteps, slots: Slots) -> Route:
        """A route where sample b reads slot ``slots[b]`` at its own timestep's interval.

        Timesteps and slots on the host (numbers, lists, CPU tensors): the rows are worked
        out there and a batch that reads one row gets a uniform route (the fast path). On an
        accelerator they stay there and nothing synchronises: always a per-sample route."""
        if all(not torch.is_tensor(v) or v.device.type == "cpu" for v in (timesteps, slots)):
            return self._host_route(timesteps, slots)
        device = self.s_out.device
        t = _as_batch(timesteps, torch.float32).to(device, non_blocking=True)
        s = _as_batch(slots, torch.long).to(device, non_blocking=True)
        t, s = _pair(t, s)
        n = self.intervals.index_select(0, s)
        # ⌊t·n/T⌋ exactly in float32: t·n < 2^24 and a non-multiple of T is ≥ 1/T from an
        # integer. Clamped, not checked, to stay free of synchronisation.
        k = torch.floor(t.float() * n / self.num_train_timesteps).long()
        k = torch.minimum(k.clamp_(min=0), n - 1)
        outs, ins = self._split()
        return Route(
            out_parts=outs, in_parts=ins, rows=s * self.max_intervals + k, **self._made_for(t)
        )

    def _made_for(self, timesteps: torch.Tensor) -> dict[str, Any]:
        """What a route of this bank is checked against (the Route fields)."""
        return {
            "base_fingerprint": self.base_fingerprint,
            "layout": self.layout,
            "bits": self.bits,
            "timesteps": timesteps,
        }

    def _host_route(self, timesteps: Timesteps, slots: Slots) -> Route:
        """:meth:`route` for timesteps and slots given on the host: the same rows, worked out
        there. When every sample reads one row (one adapter at one timestep: a generation
        and its classifier-free guidance half) the route is uniform and the layers scale
        their weights once instead of gathering per sample (tuneqdm_core/layers.py)."""
        t, s = _pair(_as_batch(timesteps, torch.float32), _as_batch(slots, torch.long))
        if s.numel() and not 0 <= int(s.min()) <= int(s.max()) < self.slots:
            raise ValueError(f"slots must lie in [0, {self.slots}), got {s.tolist()}")
        n = torch.tensor(self._host_intervals).index_select(0, s)
        k = torch.floor(t.float() * n / self.num_train_timesteps).long()
        rows = s * self.max_intervals + torch.minimum(k.clamp_(min=0), n - 1)
        outs, ins = self._split()
        first = int(rows[0])
        if not bool((rows == first).all()):
            device = self.s_out.device
            return Route(
                out_parts=outs,
                in_parts=ins,
                rows=rows.to(device, non_blocking=True),
                **self._made_for(t),
            )
        return Route(
            out_parts=outs,
            in_parts=ins,
            rows=None,
            row=first,
            ratio_parts=self._ratios(first),
            **self._made_for(t),
        )

    def _ratios(self, row: int) -> Sequence[torch.Tensor]:
        """Every layer's ``s_out / s0`` for ``row``: one division over all layers, kept until
        :meth:`load` or :meth:`reset` writes the bank (or ``.to()`` replaces its buffers)."""
        key = self.s_out.data_ptr()
        cached = self._ratio_cache.get(row)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                ratio = self.s_out.view(-1, self.layout.total_out)[row] / self.base_s_out
            cached = self._ratio_cache[row] = (key, torch.split(ratio, self.layout.out_sizes))
        return cached[1]


def _still_needed(state: QuantState) -> bool:
    """Whether a graph that read the current or a cleared route still awaits its backward."""
    state.retired = [r for r in state.retired if r.live_graphs]
    return bool(state.retired) or (state.route is not None and state.route.live_graphs > 0)


def set_route(model: nn.Module, route: Route | None) -> None:
    """Make the model's quantized layers read ``route`` until the next call (``None``: the
    plain quantized base). Prefer :func:`routed`, which also clears it.

    Raises ``RuntimeError`` on a model with gradient checkpointing on when a graph that read
    the current route has not been backpropagated yet: its backward would recompute the
    layers with the new route."""
    state = quant_state(model)
    if route is not None:
        _check_base(route, state)
        _watch_timesteps(model, state)
    if route is not state.route and _still_needed(state):
        raise RuntimeError(
            "cannot change the route while a backward pass still needs the current one: "
            "with gradient checkpointing the backward recomputes the quantized layers and "
            "reads the route again. Call backward() (or drop the outputs) first; with "
            "routed(), keep the backward inside the `with` block."
        )
    state.route = route
    # diffusers' models say whether they checkpoint; anything else is not tracked.
    state.recomputes = bool(getattr(model, "is_gradient_checkpointing", False))


def _base_difference(
    made_for: tuple[str, Layout, int | None],
    model: tuple[str, Layout, int | None],
    what: str,
    other: str,
) -> str:
    """What differs between two quantized bases, each ``(fingerprint, layout, bits)``."""
    (fingerprint, layout, bits), (model_fp, model_layout, model_bits) = made_for, model
    parts = [f"{what} was made for base {fingerprint[:12]}…, {other} is {model_fp[:12]}…"]
    if bits is not None and model_bits is not None and bits != model_bits:
        parts.append(f"{bits}-bit against {model_bits}-bit")
    if layout != model_layout:
        names = [spec.name for spec in layout.layers]
        model_names = [spec.name for spec in model_layout.layers]
        if names != model_names:
            parts.append(f"{len(names)} quantized layers against {len(model_names)}")
        else:
            parts.append("the same layers with other channel counts")
    elif fingerprint != model_fp:
        parts.append("the same layer layout, but other quantized weights")
    return "; ".join(parts)


def _check_base(route: Route, state: QuantState) -> None:
    """Refuse a route whose scales were made for another quantized base than ``state``'s."""
    if route.base_fingerprint is None:
        return
    layout = route.layout if route.layout is not None else state.layout
    if route.base_fingerprint == state.fingerprint and (
        layout is state.layout or layout == state.layout
    ):
        return
    raise ValueError(
        "the route's scales do not fit this model: "
        + _base_difference(
            (route.base_fingerprint, layout, route.bits),
            (state.fingerprint, state.layout, state.config.bits),
            "the adapter",
            "this model",
        )
        + "; load the adapter with the base it was trained on"
    )


def _timestep_reader(model: nn.Module) -> Any:
    """A function of a forward call's ``(args, kwargs)`` giving its ``timestep`` argument (by
    name, or by position in ``model.forward``'s signature); ``None`` where it has none, and
    for models other than diffusers' UNets, which may take timesteps on another scale (FLUX's
    transformer gets t/1000): those are checked once they set ``call_timesteps``."""
    if not type(model).__name__.startswith("UNet"):
        return lambda args, kwargs: None
    names = list(inspect.signature(model.forward).parameters)
    position = names.index("timestep") if "timestep" in names else None

    def read(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if "timestep" in kwargs:
            return kwargs["timestep"]
        if position is not None and position < len(args):
            return args[position]
        return None

    return read


def _check_timesteps(route: Route, called: Any) -> None:
    """Refuse a model call at other timesteps than ``route.timesteps``."""
    expected = route.timesteps
    if expected is None or called is None or called is expected:
        return
    got = torch.as_tensor(called).detach().reshape(-1).to("cpu", torch.float64)
    want = expected.detach().reshape(-1).to("cpu", torch.float64)
    if got.shape[0] not in (1, want.shape[0]) and want.shape[0] != 1:
        raise ValueError(
            f"the route was built for {want.shape[0]} timesteps but the model is called with "
            f"{got.shape[0]}; build the route from the timesteps of the call"
        )
    # A tolerance for models called with rescaled timesteps (call_timesteps scales back).
    if not bool(torch.isclose(got, want, rtol=0.0, atol=1e-3).all()):
        raise ValueError(
            f"the route was built for timesteps {_shown(want)} but the model is called at "
            f"{_shown(got)}: each sample's interval comes from its timestep, so build the "
            "route from the timesteps of the call"
        )


def _shown(t: torch.Tensor) -> str:
    values = [f"{v:g}" for v in t[:8].tolist()]
    return "[" + ", ".join(values) + (", …]" if t.shape[0] > 8 else "]")


def _watch_timesteps(model: nn.Module, state: QuantState) -> None:
    """Install (once per model) the forward pre-hook that checks the active route's
    timesteps against each call's."""
    if state.timestep_hook is not None:
        return
    default = _timestep_reader(model)

    def check(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        route = state.route
        if route is None or route.timesteps is None:
            return
        read = state.call_timesteps or default
        _check_timesteps(route, read(args, kwargs))

    state.timestep_hook = model.register_forward_pre_hook(check, with_kwargs=True)


def _clear_route(state: QuantState) -> None:
    if state.route is not None and state.route.live_graphs:
        # A backward of a graph that read it would now recompute without it: remember the
        # route so that such a backward raises (QuantState.lookup) and no route replaces it.
        state.retired.append(state.route)
    state.route = None


@contextmanager
def routed(model: nn.Module, route: Route | None) -> Iterator[Route | None]:
    """``with routed(model, route):`` the quantized layers read ``route`` inside the block;
    it is cleared on the way out, whatever happens. Run the backward inside the block."""
    set_route(model, route)
    try:
        yield route
    finally:
        _clear_route(quant_state(model))


def use_adapter(model: nn.Module, adapter: Adapter, timesteps: Timesteps) -> None:
    """Shorthand for the common case: one adapter, each sample at its own timestep."""
    set_route(model, route_adapters([adapter], timesteps))
