"""``CompiledExperts``: the one-process training forward's expert phase as one
``torch.compile`` graph (``MoELayer(compile_experts=...)``).

    x         [T, d]        tokens, in the compute dtype
    topk_ids  [T, k]        global expert ids, every slot routed (dropless routing)
    gates     [T, k]        gate weights, fp32 from the router
    w1, b1    [E, 2h|h, d], [E, 2h|h] or None
    w2, b2    [E, d, h],    [E, d] or None
    y         [T, d]        sum_j gates[t, j] * expert_{ids[t, j]}(x[t])

group (``grouping.sort_by_expert``) -> the ``grouped_mm`` variant on an aligned buffer
(``expert_variants.grouped_mm_slots``) -> combine (``combine_torch``, fp32) -> the down
bias (``bias_combine``): the same functions the eager paths run, traced whole.

Why: eagerly, each of the region's ~30 small ops (the grouping's sort, searchsorted,
cumsums and index arithmetic, the buffer copies, the activation, the combine) and their
backwards is a launch that the host issues one by one, and on one GPU at training sizes
the host is the bottleneck (benchmarks/RESULTS.md, 2026-12-07: gpu-1b's layer needs
8.25 ms of host time for 2.75 ms of device work per fwd + bwd). Traced, the compiler
fuses the index arithmetic and the elementwise work into a few kernels, its partitioner
recomputes the activation in backward instead of storing it, and forward and backward
are one call each. Shapes are static (one graph per T; ``dynamic=False``), which holds
in training, where every step passes the same T.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adaptive_moe.core.config import CompileBackend, ExpertConfig
from adaptive_moe.runtime.experts.expert_variants import grouped_mm_slots
from adaptive_moe.runtime.experts.grouping import sort_by_expert
from adaptive_moe.runtime.experts.kernel_twins import ActivationFn, combine_torch
from adaptive_moe.runtime.experts.kernels import (
    _autocast_inputs,
    _check_grouped_mm,
    bias_combine,
)
from adaptive_moe.runtime.experts.stacked import Experts


def grouped_mm_moe(
    x: Tensor,
    topk_ids: Tensor,
    gates: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    glu: bool,
    activation: ActivationFn,
) -> Tensor:
    """y [T, d] of the module docstring, in plain torch ops (what ``CompiledExperts``
    compiles; eager, it computes the same)."""
    t, k = topk_ids.shape
    order, offsets = sort_by_expert(topk_ids.reshape(-1), w1.shape[0], complete=True)
    y_slots = grouped_mm_slots(
        x, order, offsets, k, t * k, w1, b1, w2, glu, activation, traced=True
    )  # [T * k, d]
    y = combine_torch(y_slots, gates)  # [T, d]
    if b2 is None:
        return y
    return y + bias_combine(b2, topk_ids, gates, y.dtype)


class CompiledExperts:
    """``grouped_mm_moe`` under ``torch.compile`` (``fullgraph``, static shapes), for the
    experts of one layer config. Building it compiles nothing: the first call per T
    traces and compiles (seconds), later calls with the same shapes replay the graph.
    Every layer of one config shares the compiled graphs (they are cached per function
    and backend, and the weights are arguments).

    Args:
        cfg: the layer's expert config (GLU, activation).
        backend: ``"inductor"`` (generated kernels) or ``"aot_eager"`` (the same graphs
            run by eager ops: tests, debugging).
    """

    def __init__(self, cfg: ExpertConfig, backend: CompileBackend) -> None:
        self.cfg, self.backend = cfg, backend
        self._run = torch.compile(grouped_mm_moe, backend=backend, dynamic=False, fullgraph=True)

    @staticmethod
    def takes(kernel: str, dtype: torch.dtype) -> bool:
        """Whether it runs ``kernel`` in compute ``dtype``: ``grouped_mm`` in bf16 (the
        one dtype of torch's CUDA grouped GEMM, whose shape function the trace runs)."""
        return kernel == "grouped_mm" and dtype == torch.bfloat16

    def __deepcopy__(self, memo: dict[int, object]) -> CompiledExperts:
        return self  # no state of its own: the compiled graphs are torch's, per function

    def __call__(self, x: Tensor, topk_ids: Tensor, gates: Tensor, experts: Experts) -> Tensor:
        """y [T, d] for x [T, d] routed by topk_ids / gates [T, k] (no id -1), in x's
        dtype; under autocast x and the weights are cast to its dtype first, as every
        matmul would be (the compiled graph itself runs with autocast off)."""
        x, w1, b1, w2 = _autocast_inputs(x, experts.w1, experts.b1, experts.down_proj)
        _check_grouped_mm(x, w1, w2, w2.shape[2], w1.shape[0])
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):
            return self._run(
                x, topk_ids, gates, w1, b1, w2, experts.down_proj_bias, cfg.glu, cfg.activation
            )
