"""Device memory of one MoE layer's forward + backward on one rank, under a ``Strategy``.

The profiler asks this before timing a strategy, to skip the ones that cannot fit; the
model-level estimate (``calc.memory``) uses it for every MoE layer.

Notation (as in ``adaptive_moe.core.config``): T tokens on this rank, d d_model, h d_ff,
E experts, k top-k, W ranks in the expert group, s = max(1, W // E) shard count,
P_e = m*d*h weights of one expert (m = 3 with GLU, else 2), b bytes per element,
c the capacity factor (routed rows per expert relative to perfect balance; >= 1 for the
rank that receives the most).

    persistent weights   E*P_e/W * b                    the fixed layout, any strategy
    gathered weights     r=0: E*P_e * b                 DP: every expert, whole
                         1<=r<s: P_e/r * b              the h/r slice of the local expert
                         r=s (or s=1): 0
    gathered grads       the same size again: gradients of the gathered weights live
                         until their reduce-scatter in the backward
    a2a buffers          r>=1 and W>1: 2 * R*d*b        a send and a receive buffer
                         (+ R*d*b more for "2dh", its staging copy); r=0: 0
    activations          router: T*(d + E)*4            fp32 input copy, fp32 probabilities
                         routed rows: R*(n_in*d + m'*h/max(r,1) + d)*b
                         with R = k*T*c*max(r,1) rows computed here (r token copies, each
                         with an h/r slice), the last d the expert output kept for the
                         gate-weight gradient, and
                         m' = 3 with GLU (the [R, 2h] gate|up output and the product), 2
                           without (the linear's output and the activation's); 4 with GLU
                           where the activation is torch's, not the fused Triton kernel
                           (``fused_activation=False``, and always for "loop": act(gate) is
                           kept too); one less for "scatter", "gemv" and "grouped_mm",
                           whose second GEMM rebuilds the activation output from the kept
                           pre-activation in backward (``kernels.Remat``);
                         n_in d-wide copies of the rows: 0 for "scatter" on the local path
                           (r = 0 or W = 1: it reads rows in token order), else 1 (the
                           gathered or received rows; "grouped_mm"), 2 for "loop" (it also
                           keeps each expert's slice) and 3 for "bmm" (padded input and
                           output buffers).
                         Kernels that pad ("bmm": every expert to the busiest) are covered
                         by c = busiest expert's rows / mean rows. Measured against the
                         tensors autograd saves: the package's layer on CPU (torch
                         activation) and its model on an H100 (``benchmarks/memory_peak.py``).

``transient`` (gathered weights, their grads, a2a buffers) exists only while the layer
runs; ``peak`` = activations + transient is the memory the layer adds to the rank beyond
its persistent weights. The pipelining degree splits the same buffers into chunks and does
not change these sizes.
"""

from __future__ import annotations

import dataclasses

from adaptive_moe.core.checks import non_negative_int, positive_int
from adaptive_moe.core.layout import ShardLayout
from adaptive_moe.core.strategy import REBUILDS_ACTIVATION, Strategy

ROUTER_BYTES = 4  # the router runs in fp32


@dataclasses.dataclass(frozen=True)
class LayerMemory:
    """Bytes one MoE layer needs on one rank (see the module docstring for formulas)."""

    weights: int
    gathered_weights: int
    gathered_grads: int
    a2a_buffers: int
    activations: int

    @property
    def transient(self) -> int:
        return self.gathered_weights + self.gathered_grads + self.a2a_buffers

    @property
    def peak(self) -> int:
        """Memory added by one forward + backward beyond the persistent weights."""
        return self.activations + self.transient

    def to_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "transient": self.transient, "peak": self.peak}


def layer_memory(
    *,
    d_model: int,
    d_ff: int,
    num_experts: int,
    top_k: int,
    glu: bool,
    dtype_bytes: int,
    tokens: int,
    world: int,
    strategy: Strategy,
    capacity_factor: float = 1.0,
    fused_activation: bool = True,
) -> LayerMemory:
    """Bytes one MoE layer needs on one rank of a ``world``-rank expert group.

    ``fused_activation``: the Triton activation kernel runs (CUDA); False where torch's
    activation runs instead (CPU). Raises ``ValueError`` when the layout is impossible (E
    and W must divide one another, d_ff must split over the shard count) or
    ``strategy.r`` is not valid for it.
    """
    for name, value in (("d_model", d_model), ("top_k", top_k), ("dtype_bytes", dtype_bytes)):
        positive_int(name, value)
    non_negative_int("tokens", tokens)
    if not capacity_factor >= 1.0:
        raise ValueError(f"capacity_factor must be >= 1, got {capacity_factor!r}")
    layout = ShardLayout(world=world, rank=0, num_experts=num_experts, d_ff=d_ff)
    r, s = strategy.r, layout.shards
    if r not in layout.valid_r():
        raise ValueError(
            f"strategy r={r} is not valid for W={world}, E={num_experts} (shard count {s}); "
            f"valid: {layout.valid_r()}"
        )
    b = dtype_bytes
    expert = (3 if glu else 2) * d_model * d_ff
    copies = max(r, 1)
    rows = round(top_k * tokens * capacity_factor * copies)
    gathered = 0
    if world > 1 and r == 0:
        gathered = num_experts * expert * b
    elif world > 1 and r < s:
        gathered = expert // r * b
    a2a = 0
    if world > 1 and r >= 1:
        a2a = (3 if strategy.a2a == "2dh" else 2) * rows * d_model * b
    local = r == 0 or world == 1
    input_copies = {"loop": 2, "bmm": 3, "scatter": 0 if local else 1}.get(strategy.kernel, 1)
    fused = fused_activation and strategy.kernel != "loop"
    rebuilt = strategy.kernel in REBUILDS_ACTIVATION  # the product is not kept
    hidden = rows * ((2 if not glu else 3 if fused else 4) - rebuilt) * (d_ff // copies)
    return LayerMemory(
        weights=num_experts * expert // world * b,
        gathered_weights=gathered,
        gathered_grads=gathered,
        a2a_buffers=a2a,
        activations=tokens * (d_model + num_experts) * ROUTER_BYTES
        + (hidden + (input_copies + 1) * rows * d_model) * b,
    )
