"""The one-process training forward that groups rows on the device (no host counts).

* In the Triton interpreter (a child process with ``TRITON_INTERPRET=1``): with the
  ``scatter`` and ``gemv`` kernels the device-grouped forward's output, losses and every
  gradient (input, router, expert weights and biases) equal the per-expert ``loop``
  kernel's counted forward (fp32, relative error <= 1e-5), for k up to 8, dropless,
  capacity-dropping and capped modes, GLU and plain experts; under activation
  checkpointing (both implementations) the recomputation takes the forward's path and
  is not counted again; slot-space outputs of device-grouped rows that cannot prove
  every slot routed start zeroed.
* On CPU without the interpreter: the counted path runs (no Triton), and the lagged
  workload holds the previous forward's numbers; grouped_mm on device-grouped rows
  (every slot routed, buffer sized by its bound) equals the per-expert loop on host
  counts, output and gradients (fp32, <= 1e-5), with an empty expert and biases.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import adaptive_moe as am
from adaptive_moe.runtime.policy.lagged import LaggedWorkload, Workload
from tests.interpreted import INTERPRETED, run_interpreted
from tests.reference import rel_err

D, H = 16, 24
HAS_TRITON = __import__("importlib").util.find_spec("triton") is not None


def make_pair(seed: int, **kw) -> tuple[am.MoELayer, am.MoELayer]:
    torch.manual_seed(seed)
    layer = am.MoELayer(D, H, **kw)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)  # decisive routing
    ref = am.MoELayer(D, H, **kw)
    ref.load_state_dict(layer.state_dict())
    return layer, ref


def step(layer: am.MoELayer, x: torch.Tensor, **call) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and the gradients of (output, aux loss, z-loss) w.r.t. x and every parameter."""
    x = x.clone().requires_grad_(True)
    y = layer(x, **call)
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
    loss = loss + layer.aux_loss + 0.1 * layer.z_loss
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params])
    return y.detach(), list(grads)


def _poison_heap(shape: tuple[int, ...]) -> None:
    """Free NaN-filled blocks of ``shape``: a small uninitialised allocation of that size
    reuses one, so a slot-space output that is not zeroed shows NaN."""
    for _ in range(4):
        torch.full(shape, float("nan"))


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_mm_on_complete_device_rows(bias: bool) -> None:
    from adaptive_moe.runtime.experts.grouping import group_by_expert
    from adaptive_moe.runtime.experts.kernels import expert_mlp
    from adaptive_moe.runtime.inference.rows import group_static, static_expert_mlp

    g = torch.Generator().manual_seed(int(bias))
    e, k, t = 5, 2, 13
    ids = torch.randint(0, e, (t * k,), generator=g)
    ids[ids == 1] = 3  # expert 1 gets no row
    leaves = [torch.randn(t, D, generator=g), torch.randn(e, 2 * H, D, generator=g),
              torch.randn(e, 2 * H, generator=g) if bias else None,
              torch.randn(e, D, H, generator=g)]  # fmt: skip
    grad_y = torch.randn(t * k, D, generator=g)
    results = []
    for rows, kernel in ((group_static(ids, e, k, complete=True), "grouped_mm"),
                         (group_by_expert(ids, e, k), "loop")):  # fmt: skip
        x, w1, b1, w2 = (None if v is None else v.clone().requires_grad_(True) for v in leaves)
        fn = static_expert_mlp if kernel == "grouped_mm" else expert_mlp
        y = fn(x, rows, w1, b1, w2, glu=True, activation="silu", kernel=kernel)
        y.backward(grad_y)
        results.append([y.detach(), *(v.grad for v in (x, w1, b1, w2) if v is not None)])
    for got, want in zip(*results, strict=True):
        assert rel_err(got, want) <= 1e-5


def test_lagged_workload_on_cpu() -> None:
    lag = LaggedWorkload()
    assert lag.previous() is None
    lag.record(5, torch.tensor([3, 0, 7]))
    assert lag.previous() == Workload(tokens=5, max_tokens=7, slots=10)
    lag.remember(Workload(4, 2, 8))
    assert lag.previous() == Workload(4, 2, 8)


def test_counted_path_without_triton_records_the_workload() -> None:
    layer, _ = make_pair(0, num_experts=4, top_k=2)
    x = torch.randn(9, D)
    layer(x).sum().backward()
    prev = layer.policy.workload.previous()
    assert prev is not None and prev.tokens == 9 and prev.slots == 18
    assert prev.max_tokens == layer.last_max_tokens
    if not INTERPRETED:  # no Triton kernel runs on CPU: every forward is counted
        assert layer.policy.replay.recorded("path") == [None]


@pytest.mark.timeout(300)
@pytest.mark.skipif(INTERPRETED, reason="this is the parent of the interpreter run")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_interpreted_in_child(tmp_path: Path) -> None:
    run_interpreted(__file__, "TestInterpreted", tmp_path, min_tests=8, timeout=280)


@pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process")
class TestInterpreted:
    """The device-grouped forward with the real Triton kernels, interpreted on CPU."""

    @pytest.mark.parametrize("kernel", ["scatter", "gemv"])
    @pytest.mark.parametrize("k,cf,glu", [(1, 0.0, True), (2, 1.0, False), (8, -0.5, True)])
    def test_equals_loop_reference(self, kernel: str, k: int, cf: float, glu: bool) -> None:
        kw = dict(num_experts=8, top_k=k, capacity_factor=cf, bias=True)
        layer, ref = make_pair(k, **kw, activation="silu" if glu else "gelu")
        x = torch.randn(11, D)
        y, grads = step(layer, x, strategy=am.Strategy(kernel=kernel))
        assert layer.policy.replay.recorded("path") == [am.Strategy(kernel=kernel)], (
            "took the counted path"
        )
        y_ref, grads_ref = step(ref, x, strategy=am.Strategy(kernel="loop"))
        assert rel_err(y, y_ref) <= 1e-5
        for got, want in zip(grads, grads_ref, strict=True):
            assert rel_err(got, want) <= 1e-5
        assert rel_err(layer.aux_loss, ref.aux_loss) <= 1e-6
        assert rel_err(layer.z_loss, ref.z_loss) <= 1e-6

    @pytest.mark.parametrize("use_reentrant", [False, True])
    def test_activation_checkpointing(self, use_reentrant: bool) -> None:
        layer, ref = make_pair(3, num_experts=8, top_k=2, capacity_factor=1.0)
        x = torch.randn(11, D)
        strategy = am.Strategy(kernel="scatter")

        def run(m: am.MoELayer, ckpt: bool) -> tuple[list[torch.Tensor], int, int]:
            xi = x.clone().requires_grad_(True)
            if ckpt:
                y = checkpoint(lambda t: m(t, strategy=strategy), xi, use_reentrant=use_reentrant)
            else:
                y = m(xi, strategy=strategy)
            runs = sum(v["count"] for v in m.stats().values())
            (y * y).sum().backward()
            after = sum(v["count"] for v in m.stats().values())
            return [xi.grad, *(p.grad for p in m.parameters())], runs, after

        (got, runs, after), (want, _, _) = run(layer, True), run(ref, False)
        for g, w in zip(got, want, strict=True):
            assert rel_err(g, w) <= 1e-6
        assert after == runs, "the recomputation was counted"
        # Non-reentrant: the forward ran device-grouped and its recomputation popped that
        # decision. Reentrant: the forward ran under no_grad (the inference path).
        assert runs == (0 if use_reentrant else 1) and not layer.policy.replay.recorded("path")

    def test_unproven_slots_start_zeroed(self) -> None:
        from adaptive_moe.runtime.experts.kernels import ParallelLinear
        from adaptive_moe.runtime.inference.rows import group_static

        g = torch.Generator().manual_seed(0)
        ids = torch.tensor([0, -1, 2, 2, -1, 0, 1, 2])  # [N] slots, two unrouted
        w = torch.randn(3, 5, D, generator=g, requires_grad=True)
        a = torch.randn(ids.numel(), D, generator=g)  # grouped [N, D]: rows past offsets unused
        rows = group_static(ids, 3, 1)
        _poison_heap((ids.numel(), 5))
        y = ParallelLinear.apply(a, w, None, rows, True, False, False, False)  # [N, 5] slots
        assert (y[ids < 0] == 0).all() and (y[ids >= 0] != 0).all()
        x = torch.randn(ids.numel(), D, generator=g, requires_grad=True)  # token space
        h = ParallelLinear.apply(x, w, None, rows, False, True, False, False)  # [N, 5] grouped
        _poison_heap((ids.numel(), D))
        h[: int(rows.offsets[-1])].sum().backward()
        assert (x.grad[ids < 0] == 0).all() and (x.grad[ids >= 0] != 0).all()
