"""One routing plan per batch: which adapter every token uses, grouped once for every layer.

In a mixed-adapter forward every LoRA layer sees the same token -> adapter map. Grouping the
tokens by adapter (a stable device sort plus segment and tile tables) is the same work in every
layer: a 32-layer model with LoRA on 7 projections would otherwise sort 224 times per forward,
and again in backward. A :class:`RoutingPlan` does it once per batch (vLLM's
``LoRAKernelMeta.prepare_tensors`` pattern) and every layer of the forward, and the backward
(the plan's tensor is saved by autograd), reads it.

The plan is one int64 tensor (``plan.data``) of fixed size for a batch of ``M`` tokens over
``n_slots`` adapters, so it is a single graph input for torch.compile and a fixed buffer for
CUDA graphs: :meth:`RoutingPlan.update_` rewrites it in place for a new batch of the same size
and a captured graph replays with the new routing. Layout (S = min(n_slots + 1, M) segments,
T = cdiv(M, BLOCK_M) + S tiles, see :func:`sizes`)::

    ids        [M]  slot of token t, or -1 (no adapter; ids outside [-1, n_slots) unchecked: -1)
    order      [M]  stable argsort of ids: rows without an adapter first, then slot 0, 1, ...
    keys       [M]  ids[order]
    seg_start  [S]  sorted position where segment j starts (segments: runs of equal keys)
    seg_len    [S]  its length (0 for unused segments)
    seg_slot   [S]  its slot (-1 for the base-only segment and unused ones)
    tile_row0  [T]  BLOCK_M-row tiles of the segments, over sorted positions [row0, row1)
    tile_row1  [T]  (idle tiles: row0 == row1 == 0)
    tile_slot  [T]  slot of the tile (-1: base only or idle)

Eager builds check the ids once (one host sync for the whole model) and record whether the batch
uses no adapter or a single one; then the sort is skipped (the ids are already in order).
Under torch.compile, CUDA-graph capture or on the meta device, no value is read on the host:
out-of-range ids act as -1 and the sort always runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

__all__ = ["RoutingPlan", "RoutingView", "BLOCK_M", "as_plan", "sizes"]

# Rows per prefill tile of the tile table (the Triton segmented kernels' BLOCK_M). 64 keeps each
# segment's partial tile cheap (at most 63 idle rows) while feeding 64-row tensor-core MMAs; the
# interpreter uses 16 so that small CPU tests span several tiles.
BLOCK_M = 16 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 64

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def sizes(M: int, n_slots: int, block_m: int = BLOCK_M) -> tuple[int, int]:
    """(S, T): segment and tile counts of a plan for M tokens over n_slots adapters. S bounds
    the distinct keys (n_slots slots plus -1, and never more than M); T bounds the tiles,
    since sum_j cdiv(len_j, BM) <= sum_j (len_j / BM + 1) = M / BM + S."""
    S = min(n_slots + 1, M) if M > 0 else 0
    return S, (M + block_m - 1) // block_m + S


class RoutingView(NamedTuple):
    """The plan's tensors for one batch (views into ``RoutingPlan.data``)."""

    ids: Tensor
    order: Tensor
    keys: Tensor
    seg_start: Tensor
    seg_len: Tensor
    seg_slot: Tensor
    tile_row0: Tensor
    tile_row1: Tensor
    tile_slot: Tensor
    n_tiles: int


def unpack(data: Tensor, M: int, n_slots: int, block_m: int = BLOCK_M) -> RoutingView:
    """Views of a plan tensor for M tokens over n_slots adapters (see the module layout)."""
    S, T = sizes(M, n_slots, block_m)
    parts = torch.split(data, [M, M, M, S, S, S, T, T, T])
    return RoutingView(*parts, T)


def _fill(data: Tensor, ids: Tensor, n_slots: int, block_m: int, presorted: bool) -> None:
    """Compute the plan of ``ids`` into ``data`` (in place, fixed shapes, no host sync)."""
    M = ids.numel()
    v = unpack(data, M, n_slots, block_m)
    if M == 0:
        return
    key = torch.where((ids >= 0) & (ids < n_slots), ids.to(torch.int64), -1)
    v.ids.copy_(key)
    if presorted:  # eager: every id is the same, already in order
        v.keys.copy_(key)
        torch.arange(M, out=v.order, device=ids.device)
    else:
        sk, perm = torch.sort(key, stable=True)
        v.keys.copy_(sk)
        v.order.copy_(perm)
    sk = v.keys
    S = v.seg_start.numel()
    change = torch.ones(M, dtype=torch.int64, device=ids.device)
    change[1:] = (sk[1:] != sk[:-1]).to(torch.int64)
    seg_of = torch.cumsum(change, 0) - 1  # non-decreasing segment index of each sorted position
    j = torch.arange(S, dtype=torch.int64, device=ids.device)
    start = torch.searchsorted(seg_of, j)
    end = torch.searchsorted(seg_of, j, right=True)
    v.seg_start.copy_(start)
    v.seg_len.copy_(end - start)
    first = sk[start.clamp(max=M - 1)]
    v.seg_slot.copy_(torch.where(v.seg_len > 0, first, -1))
    # Tile table: segment j is cut into cdiv(len_j, BM) tiles; tile t belongs to the segment
    # whose cumulative tile count first exceeds t.
    T = v.n_tiles
    n = (v.seg_len + block_m - 1) // block_m
    cum = torch.cumsum(n, 0)
    t = torch.arange(T, dtype=torch.int64, device=ids.device)
    seg = torch.searchsorted(cum, t, right=True)
    idle = seg >= S
    jc = seg.clamp(max=S - 1)
    row0 = v.seg_start[jc] + (t - (cum[jc] - n[jc])) * block_m
    row1 = v.seg_start[jc] + v.seg_len[jc]
    v.tile_row0.copy_(torch.where(idle, 0, row0))
    v.tile_row1.copy_(torch.where(idle, 0, row1))
    v.tile_slot.copy_(torch.where(idle, -1, v.seg_slot[jc]))


def _host_checks_allowed(t: Tensor) -> bool:
    """Reading values on the host is a device sync: not under torch.compile tracing, CUDA-graph
    capture, or for meta / fake tensors (values unknown)."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


@dataclass
class RoutingPlan:
    """Which adapter slot every token of a batch uses, grouped once for every layer.

    Build it with :meth:`build` (or let :func:`fused_lora.adapter_ids`, ``MultiLoRALinear`` or
    :func:`fused_lora.multi_lora_linear` build it from raw ids) and pass it as ``adapter_ids``
    to every mixed-adapter layer of the batch.

    Attributes:
        data: the plan tensor (int64, layout in the module docstring).
        num_tokens: M, the tokens of the batch (ids flattened).
        n_slots: the bank size the ids were checked against.
        block_m: rows per tile of the tile table.
        shape: the ids' original shape (x's leading shape).
        no_adapter / single_adapter: known in eager builds (one host sync), None otherwise.
        active_slots: sorted distinct slots used (eager builds), None otherwise.
    """

    data: Tensor
    num_tokens: int
    n_slots: int
    block_m: int
    shape: tuple
    no_adapter: Optional[bool] = None
    single_adapter: Optional[bool] = None
    active_slots: Optional[tuple[int, ...]] = None

    @classmethod
    def build(cls, adapter_ids: Tensor, n_slots: int, *, validate: bool = True,
              block_m: int = BLOCK_M) -> RoutingPlan:
        """The plan of ``adapter_ids`` (an integer tensor of any shape: one id per token, -1 = no
        adapter) for a bank of ``n_slots`` adapters.

        validate: raise ValueError for ids outside [-1, n_slots) (eager only: under compile or
        graph capture ids are not read on the host, and out-of-range ids act as -1)."""
        if not isinstance(adapter_ids, Tensor):
            raise TypeError(f"adapter_ids must be a torch.Tensor, got {type(adapter_ids).__name__}")
        if adapter_ids.dtype not in _INT_DTYPES:
            raise TypeError(
                f"adapter_ids must be an integer tensor (int64 preferred), got {adapter_ids.dtype}"
            )
        if not isinstance(n_slots, int) or isinstance(n_slots, bool) or n_slots < 1:
            raise ValueError(f"n_slots must be an int >= 1, got {n_slots!r}")
        ids = adapter_ids.reshape(-1)
        M = ids.numel()
        S, T = sizes(M, n_slots, block_m)
        data = torch.zeros(3 * M + 3 * S + 3 * T, dtype=torch.int64, device=ids.device)
        plan = cls(data, M, n_slots, block_m, tuple(adapter_ids.shape))
        plan._compute(ids, validate)
        return plan

    def _compute(self, ids: Tensor, validate: bool) -> None:
        presorted = False
        self.no_adapter = self.single_adapter = self.active_slots = None
        if _host_checks_allowed(ids) and self.num_tokens:
            n = self.n_slots
            ids64 = ids.to(torch.int64)
            # One host sync for the whole model: a histogram with bins [< -1, -1, 0 .. n-1, >= n]
            # gives the range check, the slots in use and whether a sort is needed at all.
            cnt = torch.bincount(ids64.clamp(-2, n) + 2, minlength=n + 3).tolist()
            if validate and (cnt[0] or cnt[-1]):
                bad = ids64[(ids64 < -1) | (ids64 >= n)][0].item()
                raise ValueError(f"adapter_ids must be in [-1, n_slots={n}) (-1 = no adapter), got {bad}")
            self.active_slots = tuple(s for s in range(n) if cnt[s + 2])
            self.no_adapter = not self.active_slots
            self.single_adapter = len(self.active_slots) == 1 and cnt[1] + cnt[0] + cnt[-1] == 0
            # All tokens share one key (all base-only, or one adapter): already sorted.
            presorted = self.no_adapter or self.single_adapter
        _fill(self.data, ids, self.n_slots, self.block_m, presorted)

    @torch.no_grad()
    def update_(self, adapter_ids: Tensor, *, validate: bool = True) -> RoutingPlan:
        """Recompute the plan in place for a new batch with the same number of tokens (so a CUDA
        graph captured over ``data`` replays with the new routing). Returns self."""
        ids = adapter_ids.reshape(-1)
        if ids.numel() != self.num_tokens:
            raise ValueError(
                f"adapter_ids has {ids.numel()} ids but the plan was built for {self.num_tokens} "
                "tokens: build a new plan for a batch of another size"
            )
        if ids.device != self.data.device:
            raise ValueError(f"adapter_ids is on {ids.device} but the plan is on {self.data.device}")
        self._compute(ids, validate)
        return self

    def view(self) -> RoutingView:
        return unpack(self.data, self.num_tokens, self.n_slots, self.block_m)

    @property
    def ids(self) -> Tensor:
        """The checked ids, int64 [num_tokens] (out-of-range ones as -1)."""
        return self.data[: self.num_tokens]

    @property
    def device(self) -> torch.device:
        return self.data.device

    def check_for(self, lead_shape: tuple, n_slots: int, device: torch.device) -> None:
        """Raise ValueError unless this plan routes a batch of x's leading shape over a bank of
        n_slots adapters on device."""
        if tuple(lead_shape) != self.shape:
            n = 1
            for d in lead_shape:
                n *= d
            if n != self.num_tokens or len(lead_shape) == len(self.shape):
                raise ValueError(
                    f"adapter_ids (a RoutingPlan for ids of shape {self.shape}) must have x's leading "
                    f"shape {tuple(lead_shape)}: one id per token"
                )
        if n_slots != self.n_slots:
            raise ValueError(
                f"adapter_ids is a RoutingPlan built for n_slots={self.n_slots} but the bank has "
                f"n_slots={n_slots}: build the plan with the bank's size"
            )
        if device != self.data.device:
            raise ValueError(f"adapter_ids (a RoutingPlan) is on {self.data.device} but x is on {device}")


def as_plan(adapter_ids: Union[Tensor, RoutingPlan], n_slots: int, *, validate: bool = True
            ) -> RoutingPlan:
    """``adapter_ids`` as a plan: a plan is returned as is, raw ids get one built on the spot."""
    if isinstance(adapter_ids, RoutingPlan):
        return adapter_ids
    return RoutingPlan.build(adapter_ids, n_slots, validate=validate)


class BatchRouting:
    """Adapter ids set once for a whole model forward (per sequence [batch] or per token
    [batch, seq]), handing every layer the same :class:`RoutingPlan` for its input's leading
    shape, built on first use (see :func:`fused_lora.adapter_ids`). A model forward whose layers
    all see x of shape [batch, seq, hidden] builds one plan, sorts once, and every layer and the
    backward reuse it."""

    def __init__(self, ids: Tensor, n_slots: int, *, validate: bool = True) -> None:
        if ids.dim() not in (1, 2):
            raise ValueError(f"ids must be [batch] or [batch, seq], got shape {tuple(ids.shape)}")
        self.ids, self.n_slots, self.validate = ids, n_slots, validate
        # lead shape -> plan; a forward uses one shape, generate() a new one per step: keep few.
        self._plans: dict[tuple, RoutingPlan] = {}

    def per_token(self, lead: tuple) -> Tensor:
        """The ids broadcast to x's leading shape (per-sequence ids over the token dims)."""
        ids = self.ids
        if tuple(ids.shape) == lead:
            return ids
        if ids.dim() == 1 and len(lead) >= 1 and ids.shape[0] == lead[0]:
            return ids.reshape(ids.shape[0], *([1] * (len(lead) - 1))).expand(lead)
        raise ValueError(
            f"adapter_ids has shape {tuple(ids.shape)}; it must be one id per sequence "
            f"[{lead[0] if lead else '?'}] or one per token {lead}"
        )

    def plan_for(self, lead: tuple) -> RoutingPlan:
        lead = tuple(lead)
        plan = self._plans.get(lead)
        if plan is None:
            if len(self._plans) >= 4:
                self._plans.clear()
            plan = self._plans[lead] = RoutingPlan.build(self.per_token(lead), self.n_slots,
                                                         validate=self.validate)
        return plan
