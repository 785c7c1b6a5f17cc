"""The inference path (``runtime.inference``) against the training forward and references.

* one process, CPU kernels: under ``torch.no_grad()`` the layer's output and losses equal
  the training forward's (fp32: relative error <= 1e-6; bf16: <= 1e-2), for every capacity
  mode, k up to 8 and routing that leaves experts empty;
* the Triton kernels ``scatter`` and ``gemv`` in the interpreter (a child process with
  ``TRITON_INTERPRET=1``): the small-batch launcher against its plain-torch twin with
  poisoned outputs, the static path with both kernels against the training forward, and
  its op sequence (every torch op and output shape) independent of the routing, with no
  op that reads a value back to the host;
* W = 2 and 4 gloo ranks: the static token all-gather / reduce-scatter dispatch against a
  single-process float64 reference of the global batch (fp32, <= 1e-5), with expert
  slicing (E < W), capacity, and ranks of unequal T (one with none) padded to T_pad.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import adaptive_moe as am
from adaptive_moe.runtime.inference.config import InferenceConfig
from adaptive_moe.runtime.inference.rows import group_static
from tests.interpreted import INTERPRETED, run_interpreted
from tests.reference import rel_err

D, H = 16, 24
HAS_TRITON = __import__("importlib").util.find_spec("triton") is not None


def make_layer(seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> am.MoELayer:
    torch.manual_seed(seed)
    layer = am.MoELayer(D, H, dtype=dtype, **kw)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)  # decisive routing, like tests/test_layer.py
    return layer


def compare(layer: am.MoELayer, x: torch.Tensor, tol: float, **call) -> None:
    """Inference (no_grad) vs training forward: output, losses; the training path ran once
    (it records statistics), the inference path did not."""
    layer.reset_stats()
    y_train = layer(x, **call)
    aux, z = layer.aux_loss.detach(), layer.z_loss.detach()
    assert sum(v["count"] for v in layer.stats().values()) == 1
    with torch.no_grad():
        y_inf = layer(x, **call)
    assert sum(v["count"] for v in layer.stats().values()) == 1, "no_grad ran the training path"
    assert y_inf.shape == x.shape and y_inf.dtype == x.dtype
    assert rel_err(y_inf.float(), y_train.detach().float()) <= tol
    assert rel_err(layer.aux_loss, aux) <= max(tol, 1e-6)
    assert rel_err(layer.z_loss, z) <= max(tol, 1e-6)


CPU_CASES = [
    (kernel, k, cf, glu)
    for kernel in ("loop", "bmm", "grouped_mm")
    for k in (1, 2, 8)
    for cf in (0.0, 1.0, -0.5)
    for glu in (True, False)
]


@pytest.mark.parametrize("kernel,k,cf,glu", CPU_CASES)
def test_inference_equals_training_cpu(kernel: str, k: int, cf: float, glu: bool) -> None:
    layer = make_layer(
        seed=k * 7 + int(cf * 4),
        num_experts=8,
        top_k=k,
        glu=glu,
        activation="silu" if glu else "gelu",
        bias=(k + int(glu)) % 2 == 0,
        capacity_factor=cf,
    )
    compare(layer, torch.randn(29, D), 1e-6, strategy=am.Strategy(kernel=kernel))


def test_inference_empty_experts_and_shared_expert() -> None:
    # Every token's first choice is expert 5: most experts get no slot, capacity drops.
    layer = make_layer(num_experts=16, top_k=2, capacity_factor=1.0, bias=True, shared_d_ff=8)
    with torch.no_grad():
        layer.router.weight[5].zero_()
        layer.router.weight[5, 0] = 20.0
    x = torch.randn(23, D)
    x[:, 0] = x[:, 0].abs() + 1
    compare(layer, x, 1e-6)


def test_inference_bf16_and_leading_dims() -> None:
    layer = make_layer(num_experts=8, top_k=2, dtype=torch.bfloat16)
    compare(layer, torch.randn(3, 7, D, dtype=torch.bfloat16), 1e-2)


def test_inference_under_autocast() -> None:
    layer = make_layer(num_experts=8, top_k=2, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compare(layer, torch.randn(19, D), 1e-2)


def test_inference_dynamic_top_k_and_empty_batch() -> None:
    layer = make_layer(num_experts=8, top_k=2)
    compare(layer, torch.randn(17, D), 1e-6, top_k=8)
    with torch.no_grad():
        y = layer(torch.randn(0, D))
    assert y.shape == (0, D)


def test_when_the_inference_path_runs() -> None:
    layer = make_layer(num_experts=4, top_k=2).eval()
    x = torch.randn(9, D)
    layer.reset_stats()
    layer(x)  # eval, but parameters require grad: the training path
    for p in layer.parameters():
        p.requires_grad_(False)
    layer(x)  # no gradient needed: inference
    with torch.inference_mode():
        layer(x)
    assert sum(v["count"] for v in layer.stats().values()) == 1
    off = make_layer(num_experts=4, top_k=2, inference=InferenceConfig(mode="off"))
    with torch.no_grad():
        off(x)
    assert sum(v["count"] for v in off.stats().values()) == 1


def test_default_inference_kernel_rule() -> None:
    from adaptive_moe.runtime.inference.config import default_inference_kernel

    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    if HAS_TRITON:  # the rule only (no kernel runs): at most 16 rows per expert on average
        assert default_inference_kernel(cuda, bf16, 16, 2, 8) == "gemv"
        assert default_inference_kernel(cuda, bf16, 128, 8, 256) == "gemv"
        assert default_inference_kernel(cuda, bf16, 128, 2, 8) is None  # 32 rows: scatter
    assert default_inference_kernel(torch.device("cpu"), bf16, 1, 1, 8) is None


class _OpNames(TorchDispatchMode):
    """Names of the torch ops run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cf", [0.0, 1.0])
def test_losses_are_computed_when_read(cf: float) -> None:
    """One process: the inference forward runs none of the loss ops; reading aux_loss /
    z_loss afterwards gives the training forward's values (``compare`` checks them for
    every case), once; a later training forward, deepcopy and profiling see values."""
    import copy

    layer = make_layer(num_experts=8, top_k=2, capacity_factor=cf)
    x = torch.randn(13, D)
    y_train = layer(x)
    aux, z = layer.aux_loss.detach(), layer.z_loss.detach()
    rec = _OpNames()
    with torch.no_grad(), rec:
        layer(x)
    assert "logsumexp" not in rec.names and "mean" not in rec.names, rec.names
    twin = copy.deepcopy(layer)  # resolves the pending losses: the copy holds values
    assert "aux_loss" in twin.__dict__ and twin._pending_losses is None
    for m in (layer, twin):
        assert rel_err(m.aux_loss, aux) <= 1e-6 and rel_err(m.z_loss, z) <= 1e-6
    assert layer.aux_loss is layer.aux_loss  # computed once, then a plain attribute
    with torch.no_grad():
        layer(2 * x)  # deferred again ...
    y2 = layer(x)  # ... and replaced by a training forward before anyone read it
    assert rel_err(y2, y_train) <= 1e-6 and layer.aux_loss.requires_grad
    assert rel_err(layer.aux_loss, aux) <= 1e-6 and rel_err(layer.z_loss, z) <= 1e-6


def test_router_count_false_routes_the_same() -> None:
    """``count=False`` skips the count only where nothing was dropped, and the gates
    taken from top-k's values (no gather) equal the gathered ones bit for bit."""
    for cf in (0.0, 1.0, -0.25):
        layer = make_layer(num_experts=8, top_k=4, capacity_factor=cf)
        x = torch.randn(21, D)
        ref = layer.router(x)  # gradient recorded: the gather path
        with torch.no_grad():
            got = layer.router(x, count=False)
        assert torch.equal(got.topk_ids, ref.topk_ids) and torch.equal(got.gates, ref.gates)
        assert (got.counts is None) == (cf == 0.0)
        assert torch.equal(got.demand_counts(8), ref.counts)
        assert torch.equal(got.kept_counts(8), ref.kept_counts(8))


def test_group_static_offsets_on_device_order() -> None:
    eos = torch.tensor([2, -1, 0, 2, 3, -1, 0, 2])
    rows = group_static(eos, 4, 2)
    assert rows.offsets.tolist() == [0, 2, 2, 5, 6]
    assert rows.sorted_slots.tolist() == [2, 6, 0, 3, 7, 4, 1, 5]  # stable, unrouted last
    host = rows.to_expert_rows()
    assert host.counts == (2, 0, 3, 1) and host.sorted_slots.tolist() == [2, 6, 0, 3, 7, 4]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "always"}, "mode"),
        ({"dispatch": "alltoall"}, "dispatch"),
        ({"tokens_per_rank": 0}, "tokens_per_rank"),
        ({"tokens_per_rank": True}, "tokens_per_rank"),
    ],
)
def test_bad_inference_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InferenceConfig(**kwargs)
    with pytest.raises(ValueError, match="inference"):
        am.MoELayer(D, H, 4, 2, inference="auto")


# ---------------------------------------------------------------- Triton interpreter

# Ops that copy a device value to the host (a sync on GPU) or size an output by data.
_READS_BACK = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"}


class _RecordOps(TorchDispatchMode):
    """Records (op, output shapes) of every torch op run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = pytree.tree_leaves(out)
        self.ops.append((str(func), tuple(tuple(t.shape) for t in leaves if torch.is_tensor(t))))
        return out


@pytest.mark.timeout(300)
@pytest.mark.skipif(INTERPRETED, reason="this is the parent of the interpreter run")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_interpreted_kernels_in_child(tmp_path: Path) -> None:
    run_interpreted(__file__, "TestInterpreted", tmp_path, min_tests=10, timeout=280)


@pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process")
class TestInterpreted:
    """Real Triton kernels executed by the interpreter on CPU tensors."""

    @pytest.mark.parametrize("split_k", [1, 3])
    @pytest.mark.parametrize(
        "x_grouped,y_grouped,trans_w,bias",
        [(False, True, False, True), (True, False, False, False),
         (True, False, True, False), (False, False, False, True)],
    )  # fmt: skip
    def test_gemv_matches_twin_poisoned(self, split_k, x_grouped, y_grouped, trans_w, bias):
        from adaptive_moe.runtime.experts.kernels import scatter_gemm_torch
        from csrc_triton.gemv import grouped_gemv

        g = torch.Generator().manual_seed(split_k + 2 * x_grouped + 4 * y_grouped)
        e, n, kd, fan_out, tokens = 5, 40, 72, 2, 13
        num_slots = tokens * fan_out
        expert = torch.randint(-1, e, (num_slots,), generator=g)
        expert[expert == 1] = 3  # expert 1 gets no row
        rows = group_static(expert, e, fan_out)  # every slot listed, unrouted last
        kept = int(rows.offsets[-1])
        w = torch.randn(e, kd, n, generator=g) if trans_w else torch.randn(e, n, kd, generator=g)
        b = torch.randn(e, n, generator=g) if bias else None
        x = torch.randn(num_slots if x_grouped else tokens, kd, generator=g)
        args = (w, b, rows.sorted_slots, rows.offsets)
        kw = dict(fan_out=fan_out, num_slots=num_slots, x_grouped=x_grouped, y_grouped=y_grouped,
                  trans_w=trans_w)  # fmt: skip
        out = torch.full((num_slots, n), float("nan"))
        got = grouped_gemv(x, *args, **kw, out=out, split_k=split_k)
        assert got.data_ptr() == out.data_ptr()
        slots = rows.sorted_slots[:kept]
        ref = scatter_gemm_torch(x[:kept] if x_grouped else x, w, b, slots, rows.offsets, **kw)
        routed = torch.arange(kept) if y_grouped else slots
        assert rel_err(got[routed], ref[routed]) <= 1e-6
        unrouted = torch.ones(num_slots, dtype=torch.bool)
        unrouted[routed] = False
        assert unrouted.any() and got[unrouted].isnan().all(), "an unrouted row was written"

    @pytest.mark.parametrize("kernel", ["scatter", "gemv"])
    @pytest.mark.parametrize("k,cf", [(1, 0.0), (2, 1.0), (8, -0.5)])
    def test_static_path_equals_training(self, kernel, k, cf):
        layer = make_layer(seed=k, num_experts=8, top_k=k, bias=True, capacity_factor=cf)
        compare(layer, torch.randn(11, D), 1e-6, strategy=am.Strategy(kernel=kernel))

    @pytest.mark.parametrize("kernel", ["scatter", "gemv"])
    @pytest.mark.parametrize("cf", [0.0, 1.0])
    def test_static_shapes_whatever_the_routing(self, kernel, cf):
        """Every torch op of the forward and its output shapes are the same for routing
        spread over all experts and routing onto one expert, and none reads a value back
        to the host (what a CUDA graph replay needs); the host-count fallback differs."""
        layer = make_layer(num_experts=8, top_k=2, capacity_factor=cf, bias=True)
        spread = torch.randn(11, D)
        one = torch.zeros(11, D)
        one[:, 0] = 5.0  # every token to the expert of the largest router weight in column 0

        def ops(x, kern):
            rec = _RecordOps()
            with torch.no_grad(), rec:
                layer(x, strategy=am.Strategy(kernel=kern))
            return rec.ops

        ops(spread, kernel)  # the first call makes the grouping's bounds once
        assert ops(spread, kernel) == ops(one, kernel)
        assert not {name for name, _ in ops(spread, kernel)} & _READS_BACK
        assert ops(spread, "loop") != ops(one, "loop")

    @pytest.mark.parametrize("kernel", ["scatter", "gemv"])
    @pytest.mark.parametrize(
        "cf,dtype,budget",
        [(0.0, torch.float32, 12), (0.0, torch.bfloat16, 13), (1.0, torch.float32, 38)],
    )
    def test_op_budget(self, kernel, cf, dtype, budget, monkeypatch):
        """Device work per inference forward on one process, counted on CPU: torch ops
        that compute (views and empty allocations launch nothing) plus Triton launches.
        Dropless, fp32 (38 before deferring the losses and trimming the routing,
        grouping and combine; on CUDA each is one or a few kernel launches): router
        mm, softmax, top-k, renormalisation (sum, add, div); grouping sort, searchsorted;
        gemm, activation, gemm, combine. bf16 adds the router's cast of x to fp32; a
        capacity adds the router's queue positions and the unrouted slots' handling."""
        from triton.runtime import interpreter

        free = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "expand", "slice",
                "select", "as_strided", "alias", "detach", "empty", "empty_strided"}  # fmt: skip
        rec = _OpNames()
        launch = interpreter.GridExecutor.__call__

        def counted(executor, *args, **kwargs):  # a launch is one item, not its copies
            if rec in torch.utils._python_dispatch._get_current_dispatch_mode_stack():
                rec.names.append(f"triton:{executor.fn.__name__}")
            with torch.utils._python_dispatch._disable_current_modes():
                return launch(executor, *args, **kwargs)

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", counted)
        layer = make_layer(num_experts=8, top_k=2, capacity_factor=cf, dtype=dtype)
        layer.requires_grad_(False)
        x = torch.randn(11, D, dtype=dtype)
        strategy = am.Strategy(kernel=kernel)
        layer(x, strategy=strategy)  # one-time work (the grouping's bounds) first
        with rec:
            layer(x, strategy=strategy)
        work = [name for name in rec.names if name not in free]
        assert len(work) <= budget, " ".join(work)
        assert sum(name.startswith("triton:") for name in work) == 4, " ".join(work)

    def test_gemv_trains_like_scatter(self):
        layer = make_layer(num_experts=4, top_k=2)
        x = torch.randn(9, D)
        grads = []
        for kernel in ("scatter", "gemv"):
            layer.zero_grad(set_to_none=True)
            xl = x.clone().requires_grad_(True)
            layer(xl, strategy=am.Strategy(kernel=kernel)).square().sum().backward()
            grads.append((xl.grad, layer.experts.w1.grad, layer.experts.down_proj.grad))
        for a, b in zip(*grads):
            assert rel_err(a, b) <= 1e-6


# ---------------------------------------------------------------- gloo ranks


def _static_worker(rank: int, world: int, configs: list) -> list[str]:
    import torch.distributed as dist

    from tests.reference import aux_losses, experts_forward, route
    from tests.test_strategies import _global_inputs, _rounded

    failures = []
    for e, k, glu, cf, seed, equal in configs:
        w, t, x, gy = _global_inputs(world, e, glu, seed, skew=False)
        if equal:
            t = [5] * world
            x = torch.randn(sum(t), 8, generator=torch.Generator().manual_seed(seed)).double()
        w, x, _ = _rounded(w, x, gy, torch.float32)
        act = "silu" if glu else "gelu"
        # Reference: each rank's slice routed alone (capacity is per rank), experts on all.
        ids, gates, start = [], [], 0
        for n in t:
            i, g, *_ = route(x[start : start + n], w, k=k, capacity_factor=cf)
            ids.append(i)
            gates.append(g)
            start += n
        y_ref = experts_forward(x, torch.cat(ids), torch.cat(gates), w, glu=glu, activation=act)
        _, _, logits, scores, demand = route(x, w, k=k)
        bal_ref, z_ref = aux_losses(scores, logits, demand)
        cfg = InferenceConfig(dispatch="gather", tokens_per_rank=None if equal else max(t) + 2)
        layer = am.MoELayer(8, 16, e, k, glu=glu, activation=act, bias=True,
                            capacity_factor=cf, inference=cfg)  # fmt: skip
        with torch.no_grad():
            layer.router.weight.copy_(w.router)
        layer.load_expert_weights(
            **{layer.experts.w1_name: w.w1.float(), layer.experts.w1_name + "_bias": w.b1.float(),
               "down_proj": w.w2.float(), "down_proj_bias": w.b2.float()}
        )  # fmt: skip
        lo, hi = sum(t[:rank]), sum(t[: rank + 1])
        layer.reset_stats()
        for kernel in ("loop", "bmm"):
            with torch.no_grad():
                y = layer(x[lo:hi].float(), strategy=am.Strategy(kernel=kernel))
            share = t[rank] / sum(t)
            losses = torch.stack([share * layer.aux_loss, share * layer.z_loss])
            dist.all_reduce(losses)
            checks = {
                "y": rel_err(y, y_ref[lo:hi]) if hi > lo else float(y.numel() != 0),
                "aux": rel_err(losses[0], bal_ref),
                "z": rel_err(losses[1], z_ref),
                "static": float(bool(layer.stats())),  # the training path records stats
            }
            bad = {n: v for n, v in checks.items() if not v <= 1e-5}
            if bad:
                failures.append(f"E={e} k={k} glu={glu} cf={cf} T={t} {kernel}: {bad}")
    if world > 1:
        layer = am.MoELayer(8, 16, world, 1, inference=InferenceConfig(tokens_per_rank=2))
        try:
            with torch.no_grad():
                layer(torch.randn(3, 8))
            failures.append("T > tokens_per_rank was accepted")
        except ValueError as err:
            if "tokens_per_rank" not in str(err):
                failures.append(f"wrong error: {err}")
    return failures


def _static_configs(world: int) -> list:
    out = []
    for i, (e, k, glu, cf) in enumerate(
        [(max(1, world // 2), 1, True, 0.0), (world, 2, False, 1.0), (2 * world, 2, True, 0.0),
         (2 * world, 4, True, -0.5), (max(1, world // 2), 1, False, 1.0)]
    ):  # fmt: skip
        out.append((e, k, glu, cf, 300 * world + i, i % 2 == 0))
    return out


@pytest.mark.dist
@pytest.mark.parametrize(
    "world,timeout",
    [
        pytest.param(2, 60, marks=pytest.mark.timeout(90)),
        pytest.param(4, 90, marks=pytest.mark.timeout(120)),
    ],
)
def test_static_dispatch_matches_global_reference(world: int, timeout: int) -> None:
    from tests.dist_utils import run_distributed

    results = run_distributed(_static_worker, world, (_static_configs(world),), timeout=timeout)
    failures = [f for rank in results for f in rank]
    assert not failures, "\n".join(failures[:20])


def test_graph_cache_is_cuda_only_and_copies_start_empty() -> None:
    """On CPU ``cuda_graph_tokens`` changes nothing (no key, eager); a deep copy of the
    layer gets an empty cache of its own; bad values name the field."""
    import copy

    layer = make_layer(num_experts=4, top_k=2, inference=InferenceConfig(cuda_graph_tokens=8))
    x = torch.randn(5, D)
    with torch.no_grad():
        ys = [layer(x) for _ in range(3)]
    assert len(layer._static_path.graphs) == 0 and all(torch.equal(y, ys[0]) for y in ys)
    twin = copy.deepcopy(layer)
    graphs = twin._static_path.graphs
    assert graphs is not layer._static_path.graphs and len(graphs) == 0
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="cuda_graph_tokens"):
            InferenceConfig(cuda_graph_tokens=bad)
