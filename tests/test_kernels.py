"""Expert-compute kernels and variants.

* Every variant's output and gradients (x, w1, b1, w2) against an independent fp64 double
  loop (over each token's k choices and over experts) written here.
* Every Triton kernel against its plain-torch twin, with poisoned (NaN) output buffers.
* Bad input: ValueError naming the argument.
* GPU checks (``-m gpu``) in bf16 / fp16 / fp32 with stated tolerances.

Triton picks its interpreter when a kernel is decorated, i.e. when csrc_triton is
imported, so the interpreter tests (class ``TestInterpreter``) run in a child pytest
process started with ``TRITON_INTERPRET=1`` by ``test_interpreter_suite_in_child``; in
this process they are skipped, and the parent checks the child's JUnit report to make
sure they all ran and passed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch

from adaptive_moe.core.strategy import REBUILDS_ACTIVATION
from adaptive_moe.runtime.experts import kernels
from adaptive_moe.runtime.experts.expert_variants import _scatter_mlp
from adaptive_moe.runtime.experts.grouping import group_by_expert
from tests.interpreted import INTERPRETED, run_interpreted

HAS_TRITON = importlib.util.find_spec("triton") is not None
CPU = torch.device("cpu")

# Largest relative Frobenius error ||actual - ref|| / ||ref|| against the fp64 reference,
# per compute dtype ("tf32": fp32 operands rounded to TF32 in the tensor cores).
RTOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, "tf32": 5e-3}


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual.double() - expected.double()).norm().item()
    ref = expected.double().norm().item()
    # An all-zero reference must be matched exactly.
    assert err <= tol * ref or err == 0.0, f"{what}: relative error {err / max(ref, 1e-300):.2e}"


# ---------------------------------------------------------------- independent reference


def ref_act(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return h * torch.sigmoid(h)
    if activation == "gelu":
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    return h.clamp_min(0.0)


def reference_mlp(x, expert_of_slot, k, w1, b1, w2, glu, activation):  # fp64 double loop
    n_in, d = x.shape
    hidden = w2.shape[2]
    choice = expert_of_slot.view(n_in, k)
    y = x.new_zeros((n_in * k, d))
    for j in range(k):
        for e in range(w1.shape[0]):
            tok = (choice[:, j] == e).nonzero().flatten()
            h = x[tok] @ w1[e].T + (0.0 if b1 is None else b1[e])
            if glu:
                a = ref_act(h[:, :hidden], activation) * h[:, hidden:]
            else:
                a = ref_act(h, activation)
            y = y.index_put((tok * k + j,), a @ w2[e].T)
    return y


def make_routing(n_in: int, k: int, experts: int, seed: int) -> torch.Tensor:
    """[n_in*k] expert per slot: skewed towards expert 0, expert 1 empty when E > 2, and
    about a fifth of the slots dropped (-1)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.full((experts,), 1.0)
    probs[0] = experts  # skew: expert 0 gets about half the rows
    if experts > 2:
        probs[1] = 0.0
    eos = torch.multinomial(probs, max(1, n_in * k), replacement=True, generator=g)[: n_in * k]
    eos[torch.rand(n_in * k, generator=g) < 0.2] = -1
    return eos


@dataclasses.dataclass(frozen=True)
class Case:
    glu: bool
    k: int
    experts: int
    n_in: int
    bias: bool
    activation: str
    d: int = 24
    hidden: int = 20

    def __str__(self) -> str:
        kind = "glu" if self.glu else "ffn"
        bias = "bias" if self.bias else "nobias"
        return f"{kind}-k{self.k}-E{self.experts}-N{self.n_in}-{bias}-{self.activation}-d{self.d}"


_ACTS = ("silu", "gelu", "relu")
MLP_CASES = [
    Case(glu, k, e, n, bias, _ACTS[i % 3])
    for i, (glu, k, e, n, bias) in enumerate(
        itertools.product((True, False), (1, 2, 3), (1, 4), (0, 1, 37), (True, False))
    )
]
# The interpreter is slow: a covering subset of the product above.
INTERP_CASES = [
    Case(True, 2, 4, 37, True, "silu"),
    Case(False, 3, 4, 37, False, "gelu"),
    Case(True, 1, 1, 37, False, "relu"),
    Case(False, 2, 1, 1, True, "silu"),
    Case(True, 3, 4, 1, False, "gelu"),
    Case(False, 1, 4, 0, True, "relu"),
    Case(True, 3, 1, 0, False, "silu"),
]


def make_params(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = 2 * case.hidden if case.glu else case.hidden

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    x = rnd(case.n_in, case.d)
    w1 = rnd(case.experts, width, case.d, scale=case.d**-0.5)
    b1 = rnd(case.experts, width, scale=0.5) if case.bias else None
    w2 = rnd(case.experts, case.d, case.hidden, scale=case.hidden**-0.5)
    return x, w1, b1, w2


def check_mlp(case: Case, kernel: str, device: torch.device, dtype: torch.dtype, tol: float,
              fuse_act_grad: bool = False):  # fmt: skip
    """``kernel`` (or, with ``fuse_act_grad``, the Triton MLP with its activation backward
    fused into a GEMM epilogue) against the float64 double loop: output and gradients."""
    eos = make_routing(case.n_in, case.k, case.experts, seed=case.n_in + 7 * case.k)
    rows = group_by_expert(eos.to(device), case.experts, case.k)
    params = make_params(case, device, dtype)
    inputs = [p.requires_grad_() for p in params if p is not None]
    x, w1, b1, w2 = params
    if fuse_act_grad:
        y = _scatter_mlp(x, rows, w1, b1, w2, case.glu, case.activation, small=False,
                         fuse_act_grad=True)  # fmt: skip
        assert type(y.grad_fn).__name__ == "ActDownProjBackward"
    else:
        y = kernels.expert_mlp(
            x, rows, w1, b1, w2, glu=case.glu, activation=case.activation, kernel=kernel
        )
    ref_params = [None if p is None else p.detach().double().requires_grad_() for p in params]
    ref_inputs = [p for p in ref_params if p is not None]
    ref = reference_mlp(ref_params[0], eos.to(device), case.k, *ref_params[1:], case.glu,
                        case.activation)  # fmt: skip
    assert y.dtype == dtype
    assert torch.count_nonzero(y[eos.to(device) < 0]) == 0, "dropped slots must be exactly 0"
    assert_rel(y, ref, tol, f"{kernel} y")
    grad_y = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    grads = torch.autograd.grad(y, inputs, grad_y, materialize_grads=True)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_y.double(), materialize_grads=True)
    names = [n for n, p in zip(("x", "w1", "b1", "w2"), params) if p is not None]
    for name, got, want in zip(names, grads, ref_grads):
        assert got.dtype == dtype
        assert_rel(got, want, tol, f"{kernel} d{name}")


# ---------------------------------------------------------------- CPU variants


@pytest.mark.parametrize("case", MLP_CASES, ids=str)
@pytest.mark.parametrize("kernel", ["loop", "bmm", "grouped_mm"])
def test_expert_mlp_matches_reference(kernel: str, case: Case) -> None:
    assert kernel in kernels.available_kernels(CPU, torch.float32)
    check_mlp(case, kernel, CPU, torch.float32, RTOL[torch.float32])


def hidden_storages_kept(kernel: str, glu: bool) -> int:
    """Distinct storages of [rows, h]-wide tensors the expert MLP keeps for backward."""
    case = Case(glu, 2, 4, 37, True, "gelu")
    eos = make_routing(case.n_in, case.k, case.experts, seed=3)
    rows = group_by_expert(eos, case.experts, case.k)
    x, w1, b1, w2 = (p.requires_grad_() for p in make_params(case, CPU, torch.float32))
    weights = {w.untyped_storage().data_ptr() for w in (w1, b1, w2)}
    kept = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if t.shape[-1] in (case.hidden, 2 * case.hidden) and ptr not in weights:
            kept.add(ptr)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kernels.expert_mlp(x, rows, w1, b1, w2, glu=glu, activation="gelu", kernel=kernel)
    return len(kept)


@pytest.mark.parametrize("kernel", ["bmm", "grouped_mm"])
@pytest.mark.parametrize("glu", [True, False])
def test_only_the_listed_kernels_rebuild_the_activation(kernel: str, glu: bool) -> None:
    # The pre-activation is kept (and torch's GLU on CPU also keeps act(gate)); the
    # kernels in REBUILDS_ACTIVATION (kernels.Remat, which the calculator reads) do not
    # keep the product. Their gradients are checked against float64 above.
    kept = hidden_storages_kept(kernel, glu)
    assert kept == (2 if glu else 1) + (kernel not in REBUILDS_ACTIVATION)


@pytest.mark.parametrize("kernel", ["loop", "bmm"])
def test_expert_mlp_odd_sizes_fp64(kernel: str) -> None:
    # fp64 runs the same code path with rounding far below the tolerance.
    case = Case(True, 3, 5, 29, True, "gelu", d=13, hidden=7)
    check_mlp(case, kernel, CPU, torch.float64, 1e-12)


def test_available_kernels_cpu() -> None:
    scatter = ("scatter", "gemv") if INTERPRETED and HAS_TRITON else ()
    assert kernels.available_kernels(CPU, torch.float32) == ("loop", "bmm", "grouped_mm", *scatter)
    assert kernels.available_kernels(CPU, torch.float64) == ("loop", "bmm")
    fp32_misaligned = kernels.available_kernels(CPU, torch.float32, d_model=24, hidden=6)
    assert "grouped_mm" not in fp32_misaligned
    assert kernels.default_kernel(CPU, torch.float32) == "loop"


def test_expert_mlp_autocast_matches_cast_inputs() -> None:
    case = Case(True, 2, 4, 37, True, "silu")
    eos = make_routing(case.n_in, case.k, case.experts, seed=3)
    rows = group_by_expert(eos, case.experts, case.k)
    x, w1, b1, w2 = make_params(case, CPU, torch.float32)
    kw = dict(glu=True, activation="silu", kernel="loop")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.expert_mlp(x, rows, w1, b1, w2, **kw)
    bf = [t.bfloat16() for t in (x, w1, b1, w2)]
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, kernels.expert_mlp(bf[0], rows, *bf[1:], **kw))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("tokens", [0, 1, 37])
def test_combine_slots_matches_reference(tokens: int, k: int) -> None:
    g = torch.Generator().manual_seed(tokens * 3 + k)
    y = torch.randn(tokens * k, 24, dtype=torch.float64, generator=g)
    gates = torch.rand(tokens, k, dtype=torch.float64, generator=g)
    y32, g32 = y.float().requires_grad_(), gates.float().requires_grad_()
    out = kernels.combine_slots(y32, g32)
    y64, g64 = y.clone().requires_grad_(), gates.clone().requires_grad_()
    ref = sum(g64[:, j, None] * y64[j::k] for j in range(k))  # [T, d]
    assert out.dtype == torch.float32
    assert_rel(out, ref, 1e-6, "combine out")
    d_out = torch.randn(tokens, 24, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(out, (y32, g32), d_out.float(), materialize_grads=True)
    want = torch.autograd.grad(ref, (y64, g64), d_out, materialize_grads=True)
    assert_rel(got[0], want[0], 1e-6, "combine d_y")
    assert_rel(got[1], want[1], 1e-6, "combine d_gates")


def test_combine_slots_accumulates_in_fp32_under_autocast() -> None:
    """bf16 slot outputs under CPU autocast: the gated sum is still computed in fp32
    (autocast would run the twin's bmm in bf16), rounded to bf16 once."""
    g = torch.Generator().manual_seed(5)
    y = torch.randn(3 * 40, 64, generator=g).bfloat16()
    gates = torch.rand(40, 3, generator=g)
    want = (gates.double()[:, :, None] * y.double().view(40, 3, 64)).sum(1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.combine_slots(y, gates)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want)


# ---------------------------------------------------------------- bad input


def _mlp_args(**overrides):
    case = Case(True, 2, 4, 5, True, "silu")
    eos = make_routing(case.n_in, case.k, case.experts, seed=0)
    x, w1, b1, w2 = make_params(case, CPU, torch.float32)
    args = dict(x=x, rows=group_by_expert(eos, case.experts, case.k), w1=w1, b1=b1, w2=w2,
                glu=True, activation="silu", kernel="loop")  # fmt: skip
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(kernel="fast"), "kernel"),
        (dict(activation="tanh"), "activation"),
        (dict(w1=torch.zeros(3, 40, 24)), "w1"),
        (dict(w1=torch.zeros(4, 39, 24)), "w1"),
        (dict(w2=torch.zeros(4, 24, 21)), "w2"),
        (dict(b1=torch.zeros(4, 41)), "b1"),
        (dict(w2=torch.zeros(4, 24, 20, dtype=torch.float64)), "w2"),
        (dict(x=torch.zeros(6, 24)), "num_slots"),
        (dict(x=torch.zeros(5, 24, 1)), "x"),
        (dict(glu=1), "glu"),
        (dict(x=torch.zeros(5, 24, dtype=torch.float64)), "w1"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_expert_mlp_bad_input(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kernels.expert_mlp(**_mlp_args(**overrides))


def test_expert_mlp_unavailable_kernel() -> None:
    if not INTERPRETED:
        with pytest.raises(ValueError, match=r"scatter.*not available"):
            kernels.expert_mlp(**_mlp_args(kernel="scatter"))
    args = _mlp_args(kernel="grouped_mm", w1=torch.zeros(4, 12, 24), b1=None,
                     w2=torch.zeros(4, 24, 6))  # fmt: skip
    with pytest.raises(ValueError, match=r"grouped_mm.*multiples of 4"):
        kernels.expert_mlp(**args)


@pytest.mark.skipif(INTERPRETED or not HAS_TRITON, reason="needs triton, not interpreting")
def test_launcher_refuses_cpu_tensors_outside_interpreter() -> None:
    from csrc_triton.scatter_gemm import scatter_gemm

    rows = group_by_expert(torch.tensor([0, 1, -1, 0]), 2, 2)
    with pytest.raises(ValueError, match="x is on cpu"):
        scatter_gemm(
            torch.zeros(2, 8), torch.zeros(2, 4, 8), None, rows.sorted_slots, rows.offsets,
            fan_out=2, num_slots=4, x_grouped=False, y_grouped=True,
        )  # fmt: skip


def test_combine_slots_bad_input() -> None:
    with pytest.raises(ValueError, match="y_slots"):
        kernels.combine_slots(torch.zeros(7, 4), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="gates"):
        kernels.combine_slots(torch.zeros(6, 4), torch.zeros(6))


# ---------------------------------------------------------------- Triton interpreter


@pytest.mark.timeout(240)
@pytest.mark.skipif(INTERPRETED, reason="this is the parent of the interpreter run")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_interpreter_suite_in_child(tmp_path: Path) -> None:
    run_interpreted(
        __file__, "TestInterpreter", tmp_path, min_tests=len(INTERP_CASES) + 40, timeout=420
    )


@pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process")
class TestInterpreter:
    """Real Triton kernels, executed by the interpreter on CPU tensors."""

    @staticmethod
    def routing(n_in: int = 50, k: int = 2, experts: int = 3):
        # Expert 0 gets more than one 32-row tile; 40 columns span a partial second tile.
        eos = make_routing(n_in, k, experts, seed=11)
        return eos, group_by_expert(eos, experts, k)

    def gemm_problem(self, seed: int, x_grouped: bool, y_grouped: bool, trans_w: bool,
                     bias: bool, k_dim: int):  # fmt: skip
        """(eos, rows, x, w, b, launch kwargs) of one scatter_gemm layout, N = 40."""
        eos, rows = self.routing()
        n_slots, fan = rows.num_slots, rows.fan_out
        g = torch.Generator().manual_seed(seed)
        n_dim = 40
        x = torch.randn(rows.num_rows if x_grouped else n_slots // fan, k_dim, generator=g)
        w = torch.randn(3, *((k_dim, n_dim) if trans_w else (n_dim, k_dim)), generator=g)
        b = torch.randn(3, n_dim, generator=g) if bias else None
        kw = dict(fan_out=fan, num_slots=n_slots, x_grouped=x_grouped, y_grouped=y_grouped,
                  trans_w=trans_w)  # fmt: skip
        return eos, rows, x, w, b, kw

    def test_kernels_are_interpreted(self) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        from csrc_triton import elementwise, scatter_gemm, weight_grad

        for fn in (scatter_gemm._scatter_gemm_kernel.fn, weight_grad._group_weight_grad_kernel,
                   weight_grad._group_bias_grad_kernel, elementwise._activation_fwd_kernel,
                   elementwise._combine_bwd_kernel):  # fmt: skip
            assert isinstance(fn, InterpretedFunction)
        assert "scatter" in kernels.available_kernels(CPU, torch.float32)

    @pytest.mark.parametrize("case", INTERP_CASES, ids=str)
    def test_expert_mlp_scatter(self, case: Case) -> None:
        check_mlp(case, "scatter", CPU, torch.float32, RTOL[torch.float32])

    # GLU with bias, a plain FFN with k = 3 and an empty expert, no tokens at all.
    @pytest.mark.parametrize("case", [INTERP_CASES[0], INTERP_CASES[1], INTERP_CASES[5]], ids=str)
    def test_fused_activation_grad_mlp(self, case: Case) -> None:
        check_mlp(case, "scatter", CPU, torch.float32, RTOL[torch.float32], fuse_act_grad=True)

    @pytest.mark.parametrize("glu", [True, False])
    def test_fused_activation_grad_keeps_only_the_pre_activation(self, glu: bool) -> None:
        case = Case(glu, 2, 4, 37, True, "gelu")
        rows = group_by_expert(make_routing(37, 2, 4, seed=3), 4, 2)
        x, w1, b1, w2 = (p.requires_grad_() for p in make_params(case, CPU, torch.float32))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            _scatter_mlp(x, rows, w1, b1, w2, glu, "gelu", small=False, fuse_act_grad=True)
        weights = {w.untyped_storage().data_ptr() for w in (w1, b1, w2)}
        hidden = {t.untyped_storage().data_ptr() for t in saved
                  if t.shape[-1] in (case.hidden, 2 * case.hidden)} - weights  # fmt: skip
        assert len(hidden) == 1  # hcat only: neither a nor its product is kept

    @pytest.mark.parametrize("glu", [True, False])
    def test_scatter_keeps_only_the_pre_activation(self, glu: bool) -> None:
        # Triton's fused activation keeps only its input; the product is rebuilt.
        assert "scatter" in REBUILDS_ACTIVATION and hidden_storages_kept("scatter", glu) == 1

    # k_dim 40: a ragged last K step; 64: whole K steps (the unmasked EVEN_K loads).
    @pytest.mark.parametrize(
        ("x_grouped", "y_grouped", "trans_w", "bias", "k_dim"),
        [(False, True, False, True, 40), (True, False, False, False, 64),
         (False, False, False, True, 64), (True, True, False, False, 40),
         (False, True, True, False, 64), (True, False, True, True, 40)],
    )  # fmt: skip
    def test_scatter_gemm_vs_twin(self, x_grouped, y_grouped, trans_w, bias, k_dim) -> None:
        from csrc_triton.scatter_gemm import scatter_gemm

        eos, rows, x, w, b, kw = self.gemm_problem(2, x_grouped, y_grouped, trans_w, bias, k_dim)
        m, route = rows.num_rows, (rows.sorted_slots, rows.offsets)
        ref = kernels.scatter_gemm_torch(x, w, b, *route, **kw)
        out = torch.full_like(ref, float("nan"))
        tri = scatter_gemm(x, w, b, *route, out=out, **kw)
        assert tri is out
        written = torch.arange(m) if y_grouped else rows.sorted_slots
        assert_rel(tri[written], ref[written], 1e-5, "scatter_gemm")
        if not y_grouped:  # unrouted rows are left untouched ...
            assert torch.isnan(tri[eos < 0]).all()
            # ... and are zeros when the launcher allocates.
            fresh = scatter_gemm(x, w, b, *route, **kw)
            assert torch.count_nonzero(fresh[eos < 0]) == 0
            assert_rel(fresh, ref, 1e-5, "scatter_gemm allocated")

    # The Hopper variants (GEMM_VARIANTS' flags) on interpreter-sized tiles.
    # Each variant on two layouts; together every layout meets TMA (the interpreter is slow).
    @pytest.mark.parametrize(
        ("flags", "x_grouped", "y_grouped", "trans_w", "bias", "k_dim"),
        [({"TMA": True}, False, True, False, True, 40),
         ({"TMA": True}, True, False, True, False, 64),
         ({"PERSISTENT": True}, True, True, False, False, 40),
         ({"PERSISTENT": True}, False, False, True, True, 64),
         ({"TMA": True, "PERSISTENT": True, "WARP_SPEC": True}, True, True, True, False, 40),
         ({"TMA": True, "PERSISTENT": True, "WARP_SPEC": True}, False, False, False, True, 64)],
        ids=str,
    )  # fmt: skip
    def test_gemm_variants_vs_float64(self, flags, x_grouped, y_grouped, trans_w, bias,
                                      k_dim) -> None:  # fmt: skip
        import triton

        from csrc_triton.scatter_gemm import GEMM_VARIANTS, scatter_gemm

        assert any(flags.items() <= c.kwargs.items() for c in GEMM_VARIANTS.values())
        eos, rows, x, w, b, kw = self.gemm_problem(6, x_grouped, y_grouped, trans_w, bias, k_dim)
        m, route = rows.num_rows, (rows.sorted_slots, rows.offsets)
        ref = kernels.scatter_gemm_torch(
            x.double(), w.double(), None if b is None else b.double(), *route, **kw
        )
        cfg = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, **flags})
        out = torch.full(ref.shape, float("nan"))
        assert scatter_gemm(x, w, b, *route, out=out, config=cfg, **kw) is out
        written = torch.arange(m) if y_grouped else rows.sorted_slots
        assert_rel(out[written].double(), ref[written], 1e-5, f"variant {flags}")
        if not y_grouped:  # dropped slots untouched
            assert torch.isnan(out[eos < 0]).all()

    @pytest.mark.parametrize("trans_w", [False, True], ids=str)
    def test_autotuner_pre_hook_fits_the_boxes(self, trans_w: bool) -> None:
        from csrc_triton import scatter_gemm as sg

        x, w = torch.randn(64, 32), torch.randn(3, 48, 32)
        x_desc, w_desc = sg._descriptors({}, x, w, x_grouped=True, trans_w=trans_w, tuned=True)
        cfg = next(c for c in sg._scatter_gemm_tuned_tma.configs if c.pre_hook)
        cfg.pre_hook({"X_desc": x_desc, "W_desc": w_desc, "W_KN": trans_w, **cfg.kwargs})
        bm, bn, bk = (cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        assert w_desc.block_shape == ([1, bk, bn] if trans_w else [1, bn, bk])
        assert x_desc.block_shape == [bm, bk]
        assert not sg._tma_tunable(x.bfloat16(), w.bfloat16())  # a CPU: pointer loads only

    def test_tma_variant_needs_aligned_strides(self) -> None:
        import triton

        from csrc_triton.scatter_gemm import scatter_gemm

        _, rows = self.routing()
        x = torch.randn(rows.num_rows, 37)  # 148-byte rows: no tensor descriptor
        w = torch.randn(3, 40, 37)
        cfg = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2,
                             "TMA": True})  # fmt: skip
        with pytest.raises(ValueError, match="TMA=True needs w"):
            scatter_gemm(x, w, None, rows.sorted_slots, rows.offsets, fan_out=2, config=cfg,
                         num_slots=rows.num_slots, x_grouped=True, y_grouped=True)  # fmt: skip

    @pytest.mark.parametrize(
        ("activation", "glu", "variant"),
        [("gelu", False, None), ("silu", True, None), ("gelu", True, {"TMA": True}),
         ("relu", False, {"TMA": True, "PERSISTENT": True})],
        ids=str,
    )  # fmt: skip
    def test_act_grad_epilogue_vs_float64(self, activation: str, glu: bool, variant) -> None:
        import triton

        from csrc_triton.scatter_gemm import ActGrad, scatter_gemm

        # d_hcat = act'(hcat) * (dy @ w2[e]) over the grouped rows: the second expert
        # GEMM's input gradient with the activation's backward in its epilogue.
        eos, rows = self.routing()
        m, n_slots = rows.num_rows, rows.num_slots
        g = torch.Generator().manual_seed(7)
        h, d = 40, 36
        dy = torch.randn(n_slots, d, generator=g)
        dy[eos < 0] = float("nan")  # dropped slots are never read
        w2 = torch.randn(3, d, h, generator=g)
        hcat = torch.randn(m, 2 * h if glu else h, generator=g) * 2
        route = (rows.sorted_slots, rows.offsets)
        kw = dict(fan_out=1, num_slots=n_slots, x_grouped=False, y_grouped=True, trans_w=True)
        d_a = kernels.scatter_gemm_torch(dy.double(), w2.double(), None, *route, **kw)
        h64 = hcat.double().requires_grad_()
        a64 = kernels.activation_torch(h64, glu=glu, activation=activation)
        (ref,) = torch.autograd.grad(a64, h64, d_a)
        cfg = None
        if variant is not None:
            cfg = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2,
                                 **variant})  # fmt: skip
        out = torch.full(hcat.shape, float("nan"))
        got = scatter_gemm(dy, w2, None, *route, out=out, config=cfg,
                           act_grad=ActGrad(hcat, glu, activation), **kw)  # fmt: skip
        assert got is out
        assert_rel(got.double(), ref, 1e-5, f"act_grad {activation} glu={glu}")
        with pytest.raises(ValueError, match="y_grouped=True"):
            scatter_gemm(dy, w2, None, *route, act_grad=ActGrad(hcat, glu, activation),
                         **{**kw, "y_grouped": False})  # fmt: skip
        with pytest.raises(ValueError, match=r"act_grad\.hcat"):
            scatter_gemm(dy, w2, None, *route, act_grad=ActGrad(hcat[:, :-1], glu, activation),
                         **kw)  # fmt: skip

    @pytest.mark.parametrize(
        ("dy_grouped", "x_grouped"), [(True, False), (False, True), (True, True), (False, False)]
    )
    def test_group_weight_and_bias_grad_vs_twin(self, dy_grouped: bool, x_grouped: bool) -> None:
        import triton

        from csrc_triton.scatter_gemm import group_bias_grad, group_weight_grad

        _, rows = self.routing()
        m, n_slots, fan = rows.num_rows, rows.num_slots, rows.fan_out
        g = torch.Generator().manual_seed(3)
        dy = torch.randn(m if dy_grouped else n_slots, 40, generator=g)
        x = torch.randn(m if x_grouped else n_slots // fan, 36, generator=g)
        route = (rows.sorted_slots, rows.offsets)
        kw = dict(fan_out=fan, dy_grouped=dy_grouped, x_grouped=x_grouped)
        ref = kernels.group_weight_grad_torch(dy, x, *route, **kw)
        out = torch.full_like(ref, float("nan"))
        assert group_weight_grad(dy, x, *route, out=out, **kw) is out
        assert_rel(out, ref, 1e-5, "group_weight_grad")  # NaN anywhere fails
        assert torch.count_nonzero(out[1]) == 0  # expert 1 has no rows
        for prefetch, trans_dy in ((True, False), (False, True), (True, True)):
            cfg = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_N": 2,
                                 "PREFETCH": prefetch, "TRANS_DY": trans_dy})  # fmt: skip
            out = torch.full_like(ref, float("nan"))
            group_weight_grad(dy, x, *route, out=out, config=cfg, **kw)
            assert_rel(out, ref, 1e-5, f"group_weight_grad {cfg}")
        ref_b = kernels.group_bias_grad_torch(dy, *route, dy_grouped=dy_grouped)
        out_b = torch.full_like(ref_b, float("nan"))
        group_bias_grad(dy, *route, dy_grouped=dy_grouped, out=out_b)
        assert_rel(out_b, ref_b, 1e-5, "group_bias_grad")

    @pytest.mark.parametrize("glu", [True, False])
    @pytest.mark.parametrize("activation", _ACTS)
    def test_activation_vs_twin(self, activation: str, glu: bool) -> None:
        from csrc_triton.elementwise import activation_bwd, activation_fwd

        g = torch.Generator().manual_seed(4)
        hcat = (torch.randn(37, 2 * 40 if glu else 40, generator=g) * 2).requires_grad_()
        ref = kernels.activation_torch(hcat, glu=glu, activation=activation)
        d_a = torch.randn(ref.shape, generator=g)
        (ref_dh,) = torch.autograd.grad(ref, hcat, d_a)
        tri = activation_fwd(hcat.detach(), glu=glu, activation=activation)
        tri_dh = activation_bwd(hcat.detach(), d_a, glu=glu, activation=activation)
        assert_rel(tri, ref.detach(), 1e-6, "activation")
        assert_rel(tri_dh, ref_dh, 1e-6, "activation grad")

    @pytest.mark.parametrize("k", [1, 3])
    def test_combine_vs_twin(self, k: int) -> None:
        g = torch.Generator().manual_seed(5)
        y = torch.randn(9 * k, 40, generator=g, requires_grad=True)
        gates = torch.rand(9, k, generator=g, requires_grad=True)
        tri = kernels.combine_slots(y, gates)  # the Triton path under the interpreter
        ref = kernels.combine_torch(y, gates)
        d_out = torch.randn(9, 40, generator=g)
        tri_grads = torch.autograd.grad(tri, (y, gates), d_out)
        ref_grads = torch.autograd.grad(ref, (y, gates), d_out)
        assert_rel(tri, ref, 1e-6, "combine")
        assert_rel(tri_grads[0], ref_grads[0], 1e-6, "combine d_y")
        assert_rel(tri_grads[1], ref_grads[1], 1e-6, "combine d_gates")

    def test_interpreter_scalar_fix_is_installed_once(self) -> None:
        from triton.runtime import interpreter

        from csrc_triton._common import fix_interpreter_scalars

        installed = interpreter._patch_lang_tensor
        fix_interpreter_scalars()  # a second call (or module) must not wrap it again
        assert interpreter._patch_lang_tensor is installed

    # Plain layer forwards under the interpreter used to die on numpy >= 2.4 (a runtime
    # scalar as a loop bound) unless a test patched the interpreter first; this module
    # no longer does, so the kernel modules' own fix is what these runs rely on.
    @pytest.mark.parametrize(
        ("d", "h", "experts", "k", "glu", "bias", "activation"),
        [(32, 16, 4, 1, True, False, "silu"), (32, 16, 4, 2, True, True, "silu"),
         (24, 20, 3, 3, False, True, "gelu"), (24, 20, 3, 2, False, False, "relu")],
    )  # fmt: skip
    def test_layer_scatter_and_gemv_vs_loop(self, d, h, experts, k, glu, bias, activation):
        import adaptive_moe as am

        torch.manual_seed(d + 10 * k)
        layer = am.MoELayer(d_model=d, d_ff=h, num_experts=experts, top_k=k, glu=glu,
                            activation=activation, bias=bias)  # fmt: skip
        assert {"scatter", "gemv"} <= {s.kernel for s in layer.strategies()}
        x = torch.randn(8, d)  # [T, d]
        d_y = torch.randn(8, d)
        params = [p for p in layer.parameters() if p.requires_grad]

        def run(kernel: str) -> list[torch.Tensor]:
            for p in params:
                p.grad = None
            xi = x.clone().requires_grad_()
            y = layer(xi, strategy=am.Strategy(1, "linear", 1, kernel))  # [T, d]
            y.backward(d_y)
            return [y.detach(), xi.grad, *(p.grad for p in params)]

        ref = run("loop")  # plain-torch experts
        assert all(torch.isfinite(t).all() for t in ref)
        for kernel in ("scatter", "gemv"):
            got = run(kernel)
            names = ["y", "x.grad", *(n for n, p in layer.named_parameters() if p.requires_grad)]
            for name, g, r in zip(names, got, ref, strict=True):
                assert g is not None, f"{kernel}: no gradient for {name}"
                assert_rel(g, r, RTOL[torch.float32], f"{kernel} {name}")

    def test_launchers_reject_bad_input(self) -> None:
        from csrc_triton import elementwise
        from csrc_triton.scatter_gemm import group_bias_grad, group_weight_grad, scatter_gemm

        _, rows = self.routing()
        route = (rows.sorted_slots, rows.offsets)
        x, w = torch.zeros(50, 8), torch.zeros(3, 16, 8)
        kw = dict(fan_out=2, num_slots=100, x_grouped=False, y_grouped=True)
        bad = [
            (lambda: scatter_gemm(x, w[:2], None, *route, **kw), "w has 2 experts"),
            (lambda: scatter_gemm(x, w.double(), None, *route, **kw), "w must have dtype"),
            (lambda: scatter_gemm(x[:, :7], w, None, *route, **kw), "x has 7 columns"),
            (lambda: scatter_gemm(x[:49], w, None, *route, **kw), "x has 49 rows"),
            (lambda: scatter_gemm(x, w, torch.zeros(3, 15), *route, **kw), "bias"),
            (lambda: scatter_gemm(x, w, None, route[0].int(), route[1], **kw), "slots"),
            (lambda: scatter_gemm(x, w, None, route[0], route[1][:1], **kw), "offsets"),
            (lambda: scatter_gemm(x, w, None, *route, **{**kw, "fan_out": 0}), "fan_out"),
            (lambda: scatter_gemm(x, w, None, *route, **{**kw, "num_slots": 99}), "num_slots"),
            (lambda: scatter_gemm(x, w, None, *route, out=torch.zeros(3, 3), **kw), "out"),
            (lambda: scatter_gemm(x.long(), w, None, *route, **kw), "x must be float"),
            (lambda: scatter_gemm(x, w, None, *route, allow_tf32=1, **kw), "allow_tf32"),
            (lambda: group_weight_grad(torch.zeros(5, 16), x, *route, fan_out=2,
                                       dy_grouped=True, x_grouped=False), "dy has 5 rows"),
            (lambda: group_bias_grad(torch.zeros(5), *route, dy_grouped=True), "dy must be 2-D"),
            (lambda: elementwise.activation_fwd(torch.zeros(4, 5), glu=True, activation="silu"),
             "hcat"),
            (lambda: elementwise.activation_fwd(torch.zeros(4, 6), glu=True, activation="tanh"),
             "activation"),
            (lambda: elementwise.activation_bwd(torch.zeros(4, 6), torch.zeros(4, 6), glu=True,
                                                activation="silu"), "d_a"),
            (lambda: elementwise.combine_fwd(torch.zeros(7, 4), torch.zeros(3, 2)), "y_slots"),
            (lambda: elementwise.combine_bwd(torch.zeros(6, 4), torch.zeros(3, 2),
                                             torch.zeros(3, 5)), "d_out"),
        ]  # fmt: skip
        for call, match in bad:
            with pytest.raises(ValueError, match=match):
                call()


# ---------------------------------------------------------------- GPU


GPU_CASES = [
    # Odd sizes: d and h not multiples of any block, a partial K step everywhere.
    Case(True, 2, 8, 300, True, "silu", d=600, hidden=100),
    Case(False, 3, 5, 257, False, "gelu", d=100, hidden=72),
    # 16-byte aligned rows, so grouped_mm runs too.
    Case(True, 4, 16, 512, False, "relu", d=256, hidden=128),
]


@pytest.mark.gpu
class TestGPU:
    """bf16 / fp16 / fp32 on CUDA against the fp64 reference (relative Frobenius error)."""

    device = torch.device("cuda")

    # Every case in bf16, the odd-size case in fp16 and fp32 (each dtype compiles and
    # autotunes its own kernels, which dominates the run time).
    @pytest.mark.parametrize(
        ("case", "dtype"),
        [(c, torch.bfloat16) for c in GPU_CASES]
        + [(GPU_CASES[0], torch.float16), (GPU_CASES[0], torch.float32)],
        ids=str,
    )
    def test_every_kernel(self, case: Case, dtype: torch.dtype) -> None:
        shape = dict(d_model=case.d, hidden=case.hidden)
        usable = kernels.available_kernels(self.device, dtype, **shape)
        assert "scatter" in usable and "loop" in usable and "bmm" in usable
        for kernel in usable:
            check_mlp(case, kernel, self.device, dtype, RTOL[dtype])
        misaligned = "grouped_mm" not in usable
        if misaligned and "grouped_mm" in kernels.available_kernels(self.device, dtype):
            with pytest.raises(ValueError, match="grouped_mm"):  # refused with a clear error
                check_mlp(case, "grouped_mm", self.device, dtype, RTOL[dtype])

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
    def test_scatter_gemm_poisoned_and_tf32(self, dtype: torch.dtype) -> None:
        from csrc_triton.scatter_gemm import group_weight_grad, scatter_gemm

        eos = make_routing(1000, 2, 12, seed=9).cuda()
        rows = group_by_expert(eos, 12, 2)
        route = (rows.sorted_slots, rows.offsets)
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(1000, 600, device="cuda", generator=g).to(dtype)
        w = (torch.randn(12, 200, 600, device="cuda", generator=g) / 25).to(dtype)
        kw = dict(fan_out=2, num_slots=2000, x_grouped=False, y_grouped=False)
        tol = RTOL["tf32"] if dtype == torch.float32 else RTOL[dtype]
        ref = kernels.scatter_gemm_torch(x.double(), w.double(), None, *route, **kw)
        out = torch.full(ref.shape, float("nan"), device="cuda", dtype=dtype)
        scatter_gemm(x, w, None, *route, out=out, allow_tf32=True, **kw)
        kept = rows.sorted_slots
        assert torch.isnan(out[eos < 0]).all()
        assert_rel(out[kept], ref[kept], tol, "scatter_gemm")
        dy = torch.randn(2000, 200, device="cuda", generator=g).to(dtype)
        wkw = dict(fan_out=2, dy_grouped=False, x_grouped=False)
        ref_dw = kernels.group_weight_grad_torch(dy.double(), x.double(), *route, **wkw)
        dw = torch.full(ref_dw.shape, float("nan"), device="cuda", dtype=dtype)
        group_weight_grad(dy, x, *route, out=dw, allow_tf32=True, **wkw)
        assert_rel(dw, ref_dw, tol, "group_weight_grad")

    @pytest.mark.parametrize(
        ("x_grouped", "y_grouped", "trans_w"),
        [(False, True, False), (True, False, False), (False, True, True), (True, False, True)],
    )
    def test_gemm_variants(self, x_grouped: bool, y_grouped: bool, trans_w: bool) -> None:
        from csrc_triton.scatter_gemm import GEMM_VARIANTS, scatter_gemm

        # Skewed routing, an empty expert, dropped slots; 600 / 200 columns: ragged tiles.
        eos = make_routing(1000, 2, 12, seed=9).cuda()
        rows = group_by_expert(eos, 12, 2)
        route = (rows.sorted_slots, rows.offsets)
        g = torch.Generator(device="cuda").manual_seed(0)
        k_dim = 200 if trans_w else 600  # w [12, 200, 600] read as [E, N, K] or [E, K, N]
        x = torch.randn(rows.num_rows if x_grouped else (1000 if y_grouped else 2000), k_dim,
                        device="cuda", generator=g).bfloat16()  # fmt: skip
        w = (torch.randn(12, 200, 600, device="cuda", generator=g) / 25).bfloat16()
        fan = 2 if not x_grouped and y_grouped else 1
        kw = dict(fan_out=fan, num_slots=2000, x_grouped=x_grouped, y_grouped=y_grouped,
                  trans_w=trans_w)  # fmt: skip
        ref = kernels.scatter_gemm_torch(x.double(), w.double(), None, *route, **kw)
        written = torch.arange(rows.num_rows) if y_grouped else rows.sorted_slots
        for name, cfg in GEMM_VARIANTS.items():
            out = torch.full(ref.shape, float("nan"), device="cuda", dtype=torch.bfloat16)
            scatter_gemm(x, w, None, *route, out=out, config=cfg, **kw)
            assert_rel(out[written], ref[written], RTOL[torch.bfloat16], name)
            if not y_grouped:
                assert torch.isnan(out[eos < 0]).all()

    @pytest.mark.parametrize("trans_w", [False, True], ids=str)
    def test_autotuned_tma_configs(self, monkeypatch, trans_w: bool) -> None:
        """Each TMA config of the Hopper autotuner, alone (its pre-hook fitting the
        launcher's placeholder boxes), on both layouts, poisoned, against float64."""
        import triton

        import csrc_triton.scatter_gemm as sg

        eos = make_routing(1000, 2, 12, seed=9).cuda()
        rows = group_by_expert(eos, 12, 2)
        route = (rows.sorted_slots, rows.offsets)
        g = torch.Generator(device="cuda").manual_seed(1)
        x = torch.randn(rows.num_rows, 256, device="cuda", generator=g).bfloat16()
        w = (torch.randn(12, 256, 256, device="cuda", generator=g) / 16).bfloat16()
        assert sg._tma_tunable(x, w) == (torch.cuda.get_device_capability()[0] >= 9)
        kw = dict(fan_out=1, num_slots=2000, x_grouped=True, y_grouped=False, trans_w=trans_w)
        ref = kernels.scatter_gemm_torch(x.double(), w.double(), None, *route, **kw)
        tma_configs = [c for c in sg._scatter_gemm_tuned_tma.configs if c.pre_hook]
        assert len(tma_configs) == len(sg.GEMM_CONFIGS)
        for cfg in tma_configs:
            one = triton.autotune(configs=[cfg], key=sg._TUNING_KEY)(sg._scatter_gemm_kernel)
            monkeypatch.setattr(sg, "_scatter_gemm_tuned_tma", one)
            out = torch.full(ref.shape, float("nan"), device="cuda", dtype=torch.bfloat16)
            sg.scatter_gemm(x, w, None, *route, out=out, **kw)
            assert_rel(out[rows.sorted_slots], ref[rows.sorted_slots], RTOL[torch.bfloat16],
                       str(cfg))  # fmt: skip
            assert torch.isnan(out[eos < 0]).all()

    @pytest.mark.parametrize("case", GPU_CASES, ids=str)
    def test_fused_activation_grad_mlp(self, case: Case) -> None:
        check_mlp(case, "scatter", self.device, torch.bfloat16, RTOL[torch.bfloat16],
                  fuse_act_grad=True)  # fmt: skip

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
    def test_combine(self, dtype: torch.dtype) -> None:
        g = torch.Generator(device="cuda").manual_seed(0)
        y = torch.randn(4096 * 8, 600, device="cuda", generator=g).to(dtype).requires_grad_()
        gates = torch.rand(4096, 8, device="cuda", generator=g).requires_grad_()
        out = kernels.combine_slots(y, gates)
        y64, g64 = y.detach().double().requires_grad_(), gates.detach().double().requires_grad_()
        ref = kernels.combine_torch(y64, g64)
        d_out = torch.randn(4096, 600, device="cuda", generator=g)
        got = torch.autograd.grad(out, (y, gates), d_out.to(dtype))
        want = torch.autograd.grad(ref, (y64, g64), d_out.double())
        assert_rel(out, ref, RTOL[dtype], "combine")
        assert_rel(got[0], want[0], RTOL[dtype], "combine d_y")
        assert_rel(got[1], want[1], RTOL[dtype], "combine d_gates")

    @staticmethod
    def tile_routing(kind: str, n_in: int, k: int, experts: int) -> torch.Tensor:
        """[n_in*k] expert per slot: ``skewed`` (make_routing: a hot expert 0, an empty
        expert 1, dropped slots) or ``one_expert`` (every slot on expert 0)."""
        if kind == "one_expert":
            return torch.zeros(n_in * k, dtype=torch.long)
        return make_routing(n_in, k, experts, seed=21)

    @pytest.mark.parametrize("routing", ["skewed", "one_expert"])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
    def test_every_tile_config(self, dtype: torch.dtype, routing: str) -> None:
        """Every autotuning candidate that fits the dtype's shared memory (and every
        PREFETCH / TRANS_DY combination of the weight-gradient kernel) launched as a fixed
        config, on odd sizes (K=600, N=100: no
        multiple of 16), k=8, with NaN-poisoned outputs, against the fp64 twins."""
        import triton

        from csrc_triton import scatter_gemm as sg

        n_in, k, e, d, n = 150, 8, 6, 600, 100
        eos = self.tile_routing(routing, n_in, k, e).cuda()
        rows = group_by_expert(eos, e, k)
        route, m, n_slots = (rows.sorted_slots, rows.offsets), rows.num_rows, n_in * k
        g = torch.Generator(device="cuda").manual_seed(0)

        def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

        tol = RTOL["tf32"] if dtype == torch.float32 else RTOL[dtype]
        size = torch.empty((), dtype=dtype).element_size()

        def fits(cfg: triton.Config, rows: str, inner: str, cols: str) -> bool:
            # the autotuner's pruning: fp32 operands drop the configs that overflow smem
            kw = cfg.kwargs
            return cfg.num_stages * size * kw[inner] * (kw[rows] + kw[cols]) <= sg._SMEM_BYTES

        x_tok, x_grp, w = rnd(n_in, d), rnd(m, d), rnd(e, n, d, scale=d**-0.5)
        layouts = [(x_tok, dict(fan_out=k, x_grouped=False, y_grouped=True)),
                   (x_grp, dict(fan_out=k, x_grouped=True, y_grouped=False))]  # fmt: skip
        for cfg in [c for c in sg.GEMM_CONFIGS if fits(c, "BLOCK_M", "BLOCK_K", "BLOCK_N")]:
            for x, lay in layouts:
                kw = dict(lay, num_slots=n_slots)
                ref = kernels.scatter_gemm_torch(x.double(), w.double(), None, *route, **kw)
                out = torch.full(ref.shape, float("nan"), device="cuda", dtype=dtype)
                sg.scatter_gemm(x, w, None, *route, out=out, allow_tf32=True, config=cfg, **kw)
                written = slice(None) if lay["y_grouped"] else rows.sorted_slots
                assert_rel(out[written], ref[written], tol, f"scatter_gemm {cfg} {lay}")
                if not lay["y_grouped"]:
                    assert torch.isnan(out[eos < 0]).all()  # unrouted slots untouched
        dy_slots, dy_grp, xw = rnd(n_slots, n), rnd(m, n), rnd(n_in, d)
        base = sg.WGRAD_CONFIGS[0]  # and the flag combinations the candidates lack
        wcfgs = [*sg.WGRAD_CONFIGS, triton.Config({**base.kwargs, "PREFETCH": False},
                 num_warps=base.num_warps, num_stages=base.num_stages)]  # fmt: skip
        for cfg in [c for c in wcfgs if fits(c, "BLOCK_N", "BLOCK_M", "BLOCK_K")]:
            for dy, x, lay in ((dy_slots, x_grp, dict(dy_grouped=False, x_grouped=True)),
                               (dy_grp, xw, dict(dy_grouped=True, x_grouped=False))):  # fmt: skip
                kw = dict(lay, fan_out=k)
                ref = kernels.group_weight_grad_torch(dy.double(), x.double(), *route, **kw)
                out = torch.full(ref.shape, float("nan"), device="cuda", dtype=dtype)
                sg.group_weight_grad(dy, x, *route, out=out, allow_tf32=True, config=cfg, **kw)
                assert_rel(out, ref, tol, f"group_weight_grad {cfg} {lay}")
                assert torch.count_nonzero(out[1]) == 0  # an empty expert gets zeros


# ---------------------------------------------------------------- measured kernel choice


def test_kernel_choice_measures_once_per_key_and_takes_the_reduced_minimum() -> None:
    calls = []

    def measure(kernels_: list[str]) -> list[float]:
        calls.append(tuple(kernels_))
        return [2.0, 3.0]  # this rank: scatter faster

    other_rank = [5.0, 3.5]  # another rank: scatter much slower there
    choice = kernels.KernelChoice()
    key = ("cuda", torch.bfloat16, 14, 3)
    reduce = lambda ms: [max(a, b) for a, b in zip(ms, other_rank)]  # the group's MAX
    assert choice.choose(key, ["scatter", "grouped_mm"], measure, reduce) == "grouped_mm"
    assert choice.choose(key, ["scatter", "grouped_mm"], measure, reduce) == "grouped_mm"
    assert calls == [("scatter", "grouped_mm")]  # cached: measured once
    assert choice.times[key] == {"scatter": 5.0, "grouped_mm": 3.5}
    # A new key measures again; without a reduction this rank's times decide.
    assert choice.choose(("cuda", torch.bfloat16, 15, 3), ["scatter", "grouped_mm"],
                         measure) == "scatter"  # fmt: skip
    assert len(calls) == 2
    # One candidate needs no measurement; none is an error.
    assert choice.choose(("cpu",), ["loop"], measure) == "loop" and len(calls) == 2
    with pytest.raises(ValueError, match="candidates"):
        choice.choose(("x",), [], measure)
    with pytest.raises(ValueError, match="measure returned"):
        choice.choose(("y",), ["loop", "bmm"], lambda ks: [1.0])


def test_time_expert_kernels_leaves_gradients_and_graph_alone() -> None:
    case = Case(True, 2, 4, 37, True, "silu")
    eos = make_routing(case.n_in, case.k, case.experts, seed=3)
    rows = group_by_expert(eos, case.experts, case.k)
    x, w1, b1, w2 = make_params(case, CPU, torch.float32)
    x.requires_grad_()
    params = [w1.requires_grad_(), b1.requires_grad_(), w2.requires_grad_()]
    ms = kernels.time_expert_kernels(x, rows, w1, b1, w2, glu=True, activation="silu",
                                     kernels=["loop", "bmm"], warmup=1, repeats=2)  # fmt: skip
    assert len(ms) == 2 and all(t > 0 for t in ms)
    assert x.grad is None and all(p.grad is None for p in params)


def test_single_process_profiles_and_uses_a_table() -> None:
    """A layer with no process group profiles itself and runs its table's strategy
    (and then measures nothing itself)."""
    import warnings

    import adaptive_moe as am
    from adaptive_moe.profiling import profiler

    torch.manual_seed(0)
    layer = am.MoELayer(32, 48, 4, 2)
    assert layer.mesh is None
    table = profiler.profile_layer(layer, 64, num_buckets=2, repeats=2, warmup=1, progress=False)
    assert table.fingerprint == layer.fingerprint() and table.entries
    layer.use_table(table)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no strategy table" warning any more
        layer(torch.randn(64, 32)).sum().backward()
    assert layer.last_strategy == table.lookup(layer.last_max_tokens)
    assert layer.kernel_choice.times == {}
