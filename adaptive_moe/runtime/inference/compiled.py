"""``CompiledExperts``: the one-process training forward's experts and losses as one
``torch.compile`` graph (``MoELayer(compile_experts=...)``).

    x         [T, d]        tokens (any float dtype; cast to the compute dtype inside)
    topk_ids  [T, k]        global expert ids, every slot routed (dropless routing)
    gates     [T, k]        gate weights, fp32 from the router
    scores    [T, E]        the router's fp32 scores, logits [T, E] its fp32 logits
    demand    [E]           slots routed to each expert
    w1, b1    [E, 2h|h, d], [E, 2h|h] or None     the stored (master) weights
    w2, b2    [E, d, h],    [E, d] or None
    y         [T, d]        sum_j gates[t, j] * expert_{ids[t, j]}(x[t]), compute dtype
    aux, z    0-dim fp32    the balance loss and the z-loss

cast (x, w1, b1, w2 to the compute dtype, as autocast would) -> group
(``grouping.sort_by_expert``) -> the ``grouped_mm`` variant on an aligned buffer
(``expert_variants.grouped_mm_slots``) -> combine (``combine_torch``, fp32) -> the down
bias (``bias_combine``); the losses (``balance_loss_static``, ``z_loss``): the same
functions the eager paths run, traced whole.

Why: eagerly, each of the region's ~40 small ops (casts, the grouping's sort,
searchsorted, cumsums and index arithmetic, the buffer copies, the activation, the
combine, the losses) and their backwards is a launch that the host issues one by one,
and on one GPU at training sizes the host is the bottleneck (benchmarks/RESULTS.md,
2026-12-07: gpu-1b's layer needs 8.25 ms of host time for 2.75 ms of device work per
fwd + bwd). Traced, the compiler fuses the index arithmetic and the elementwise work
into a few kernels, its partitioner recomputes the activation in backward instead of
storing it, the weight gradients leave the graph in the masters' dtype, and forward and
backward are one call each. Shapes are static (one graph per T; ``dynamic=False``),
which holds in training, where every step passes the same T. The router and the
strategy choice stay eager.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adaptive_moe.core.config import CompileBackend, ExpertConfig
from adaptive_moe.runtime.experts.expert_variants import grouped_mm_slots
from adaptive_moe.runtime.experts.grouping import sort_by_expert
from adaptive_moe.runtime.experts.kernel_twins import ActivationFn, combine_torch
from adaptive_moe.runtime.experts.kernels import _check_grouped_mm, bias_combine
from adaptive_moe.runtime.experts.stacked import Experts
from adaptive_moe.runtime.inference.rows import balance_loss_static
from adaptive_moe.runtime.routing.router import Routing, z_loss


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
    """y [T, d] of the module docstring from tensors already in the compute dtype, in
    plain torch ops (eager, it computes what the graph computes)."""
    t, k = topk_ids.shape
    order, offsets = sort_by_expert(topk_ids.reshape(-1), w1.shape[0], complete=True)
    y_slots = grouped_mm_slots(
        x, order, offsets, k, t * k, w1, b1, w2, glu, activation, traced=True
    )  # [T * k, d]
    y = combine_torch(y_slots, gates)  # [T, d]
    if b2 is None:
        return y
    return y + bias_combine(b2, topk_ids, gates, y.dtype)


def one_process_step(
    x: Tensor,
    topk_ids: Tensor,
    gates: Tensor,
    scores: Tensor,
    logits: Tensor,
    demand: Tensor,
    weights: tuple[Tensor, Tensor | None, Tensor, Tensor | None],
    glu: bool,
    activation: ActivationFn,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, aux, z) of the module docstring: what ``CompiledExperts`` compiles."""
    w1, b1, w2, b2 = weights
    b1 = None if b1 is None else b1.to(dtype)
    y = grouped_mm_moe(x.to(dtype), topk_ids, gates, w1.to(dtype), b1, w2.to(dtype), b2,
                       glu, activation)  # fmt: skip
    return y, balance_loss_static(scores, demand), z_loss(logits)


class CompiledExperts:
    """``one_process_step`` under ``torch.compile`` (``fullgraph``, static shapes), for
    the experts of one layer config. Building it compiles nothing: the first call per T
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
        self._run = torch.compile(one_process_step, backend=backend, dynamic=False,
                                  fullgraph=True)  # fmt: skip

    @staticmethod
    def takes(kernel: str, dtype: torch.dtype) -> bool:
        """Whether it runs ``kernel`` in compute ``dtype``: ``grouped_mm`` in bf16 (the
        one dtype of torch's CUDA grouped GEMM, whose shape function the trace runs)."""
        return kernel == "grouped_mm" and dtype == torch.bfloat16

    def __deepcopy__(self, memo: dict[int, object]) -> CompiledExperts:
        return self  # no state of its own: the compiled graphs are torch's, per function

    def __call__(
        self, x: Tensor, routing: Routing, experts: Experts, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(y [T, d] in ``dtype``, aux, z) for x [T, d] and its dropless ``routing``;
        ``dtype``: the compute dtype (autocast's, or the weights'). The graph runs with
        autocast off and casts x and the weights itself."""
        w1, w2 = experts.w1, experts.down_proj
        _check_grouped_mm(x, w1, w2, w2.shape[2], w1.shape[0], dtype=dtype)
        weights = (w1, experts.b1, w2, experts.down_proj_bias)
        demand = routing.demand_counts(self.cfg.num_experts)  # [E]
        with torch.autocast(x.device.type, enabled=False):
            return self._run(
                x, routing.topk_ids, routing.gates, routing.scores, routing.logits, demand,
                weights, self.cfg.glu, self.cfg.activation, dtype,
            )  # fmt: skip
