"""Decode-time MoE forward on one GPU against its weight-read floor.

    python benchmarks/decode.py [--shapes mixtral,fine256] [--tokens 1,16,128]
                                [--kernels gemv,scatter] [--ffn swiglu|gelu] [--no-train]
                                [--profile DIR] [--out decode.json]

Forward only, bf16, SwiGLU (``--ffn gelu``: plain GELU) experts, random routing (a linear
router on Gaussian tokens), no gradient (the layer's static inference path,
``runtime.inference``). For every shape, token count T and kernel:

    eager     ms per ``layer(x)`` in a loop of back-to-back calls (host clock, one sync
              per loop): every kernel launched from Python
    graph     the same loop replaying one ``torch.cuda.CUDAGraph`` captured at T
    cached    the eager loop with the layer's own graph cache on
              (``InferenceConfig(cuda_graph_tokens=T)``: copy in, replay, copy out)
    g.cold    ``triton.testing.do_bench`` of the replay: device time alone, L2 flushed
              before every call
    host      CPU time of the calling thread per eager call (the same loop): when it is
              close to ``eager`` the forward is host-bound
    launches  CUDA kernel launches per eager forward (torch.profiler, one forward:
              cudaLaunchKernel / cuLaunchKernel* calls, Triton's included)
    train     the eager loop on the training path's forward under no_grad (counts copied
              to the host, ``InferenceConfig(mode="off")``), for comparison (``--no-train``:
              skipped)
    mlp       device ms of the expert GEMMs and activation alone (cold L2), one batch
    floor     bytes of the experts the routing touches (gate_up + down of each expert
              with at least one slot) / device-to-device copy bandwidth measured in
              this run (bytes read + written, 1 GiB copies)

Each timed call first copies the next of 8 token batches into the input (new routing
every call, so consecutive calls touch different experts). The touched bytes are
averaged over the 8 batches. Graph replay output is checked against the eager output on
the same batch (``err``, relative Frobenius).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
import warnings

import torch

import adaptive_moe as am
from adaptive_moe.runtime.inference.config import InferenceConfig
from adaptive_moe.runtime.inference.rows import group_static, static_expert_mlp

SHAPES = {  # name: (d, h, E, k)
    "mixtral": (4096, 14336, 8, 2),
    "fine256": (2048, 512, 256, 8),
}
BATCHES = 8


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + written) over 1 GiB buffers."""
    from triton.testing import do_bench

    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def touched_bytes(layer: am.MoELayer, xs: list[torch.Tensor]) -> float:
    """Mean bytes of the expert weights the routing of each batch touches."""
    ex = layer.experts
    per_expert = (ex.w1[0].numel() + ex.down_proj[0].numel()) * ex.w1.element_size()
    total = 0
    with torch.no_grad():
        for x in xs:
            ids = layer.router(x).topk_ids
            total += int(torch.unique(ids[ids >= 0]).numel()) * per_expert
    return total / len(xs)


def launches_per_call(fn) -> int:
    """CUDA kernel launches (runtime or driver API) of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
    return sum(e.count for e in prof.key_averages() if e.key in names)


def host_profile(fn, path: str, calls: int = 20) -> None:
    """torch.profiler CPU table of ``calls`` calls of ``fn`` (host time by op), to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    with open(path, "w") as f:
        f.write(f"{calls} calls\n{table}\n")


def bench(
    fn, xs: list[torch.Tensor], static_x: torch.Tensor, cold: bool = False, host: list | None = None
) -> float:
    """ms per call of ``fn``, the next batch copied into ``static_x`` before each call.

    Default: host clock around 32 back-to-back calls and one synchronisation, median of 7
    such loops; this is the latency a decode loop sees, host launch overhead included.
    ``cold``: ``triton.testing.do_bench`` (device events around each call, L2 flushed
    before it), median: device time alone. ``host``: a list to which the median CPU
    time of this thread per call (ms) is appended."""
    state = {"i": 0}

    def step() -> None:
        static_x.copy_(xs[state["i"] % len(xs)])
        state["i"] += 1
        fn()

    if cold:
        from triton.testing import do_bench

        return do_bench(step, warmup=25, rep=200, return_mode="median")
    for _ in range(8):
        step()
    loops, cpu = [], []
    for _ in range(7):
        torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.thread_time()
        for _ in range(32):
            step()
        cpu.append((time.thread_time() - cpu_start) * 1e3 / 32)  # before the wait
        torch.cuda.synchronize()
        loops.append((time.perf_counter() - start) * 1e3 / 32)
    if host is not None:
        host.append(statistics.median(cpu))
    return statistics.median(loops)


def expert_mlp_ms(layer: am.MoELayer, x: torch.Tensor, kernel: str) -> float:
    """Device ms of the two expert GEMMs + activation alone (cold L2), x's routing."""
    from triton.testing import do_bench

    ids = layer.router(x).topk_ids
    rows = group_static(ids.flatten(), layer.expert_cfg.num_experts, ids.shape[1])
    ex, cfg = layer.experts, layer.expert_cfg
    kw = {"glu": cfg.glu, "activation": cfg.activation, "kernel": kernel}
    run = lambda: static_expert_mlp(x, rows, ex.w1, ex.b1, ex.down_proj, **kw)
    return do_bench(run, warmup=25, rep=100, return_mode="median")


def make_layer(name: str, ffn: str = "swiglu") -> am.MoELayer:
    d, h, e, k = SHAPES[name]
    torch.manual_seed(0)
    act = (
        {"glu": True, "activation": "silu"}
        if ffn == "swiglu"
        else {"glu": False, "activation": "gelu"}
    )
    layer = am.MoELayer(d, h, e, k, **act, dtype=torch.bfloat16, device="cuda").eval()
    return layer.requires_grad_(False)


def run_case(
    layer: am.MoELayer,
    name: str,
    t: int,
    kernel: str,
    bw: float,
    train: bool = True,
    profile_dir: str | None = None,
) -> dict:
    d = layer.expert_cfg.d_model
    layer.inference = InferenceConfig()
    xs = [torch.randn(t, d, device="cuda", dtype=torch.bfloat16) for _ in range(BATCHES)]
    static_x = xs[0].clone()
    strategy = am.Strategy(kernel=kernel)
    with torch.inference_mode():
        for x in xs[:3]:  # compile / autotune every kernel at this T before capture
            layer(x, strategy=strategy)
        torch.cuda.synchronize()
        host: list[float] = []
        eager_ms = bench(lambda: layer(static_x, strategy=strategy), xs, static_x, host=host)
        launches = launches_per_call(lambda: layer(static_x, strategy=strategy))
        if profile_dir:
            host_profile(
                lambda: layer(static_x, strategy=strategy), f"{profile_dir}/{name}_{t}_{kernel}.txt"
            )
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x, strategy=strategy)
        static_x.copy_(xs[1])
        graph.replay()
        ref = layer(xs[1], strategy=strategy)
        err = float((static_y.float() - ref.float()).norm() / ref.float().norm())
        graph_ms = bench(graph.replay, xs, static_x)
        cold_ms = bench(graph.replay, xs, static_x, cold=True)
        cached_ms = float("nan")  # a tree without the layer's graph cache: not measured
        if "cuda_graph_tokens" in {f.name for f in dataclasses.fields(InferenceConfig)}:
            layer.inference = InferenceConfig(cuda_graph_tokens=t)
            cached_ms = bench(lambda: layer(static_x, strategy=strategy), xs, static_x)
            layer.inference = InferenceConfig()
            layer._static_path.graphs.clear()  # its memory pools
        train_ms = float("nan")
        if train:
            layer.inference = InferenceConfig(mode="off")
            train_ms = bench(lambda: layer(static_x, strategy=strategy), xs, static_x)
        mlp_ms = expert_mlp_ms(layer, xs[0], kernel)
    floor_ms = touched_bytes(layer, xs) / bw * 1e3
    del graph
    return {
        "shape": name, "T": t, "kernel": kernel, "eager_ms": eager_ms, "host_ms": host[0],
        "launches": launches, "graph_ms": graph_ms,
        "graph_cold_ms": cold_ms, "cached_ms": cached_ms, "train_ms": train_ms,
        "mlp_ms": mlp_ms, "floor_ms": floor_ms,
        "eager_x": eager_ms / floor_ms, "graph_x": graph_ms / floor_ms,
        "graph_cold_x": cold_ms / floor_ms, "replay_rel_err": err,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="mixtral,fine256")
    parser.add_argument("--tokens", default="1,16,128")
    parser.add_argument("--kernels", default="gemv,scatter")
    parser.add_argument("--ffn", choices=("swiglu", "gelu"), default="swiglu")
    parser.add_argument("--no-train", action="store_true", help="skip the training-path loop")
    parser.add_argument("--profile", default=None, help="write host profiles to this folder")
    parser.add_argument("--out", default=None, help="write every row as JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    bw = copy_bandwidth()
    dev = torch.cuda.get_device_name()
    print(f"{dev}, torch {torch.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    print(f"ffn {args.ffn}, ms per forward", flush=True)
    head = (
        f"{'shape':8} {'T':>4} {'kernel':8} {'eager':>8} {'host':>8} {'launch':>6} {'cached':>8} "
    )
    head += f"{'graph':>8} {'g.cold':>8} {'train':>8} {'mlp':>8} {'floor':>8} "
    head += f"{'eager/fl':>8} {'graph/fl':>8} {'cold/fl':>8}"
    print(head + f" {'err':>8}", flush=True)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    for name in args.shapes.split(","):
        layer = make_layer(name, args.ffn)
        for t in (int(v) for v in args.tokens.split(",")):
            for kernel in args.kernels.split(","):
                r = run_case(layer, name, t, kernel, bw, not args.no_train, args.profile)
                r["ffn"] = args.ffn
                rows.append(r)
                print(
                    f"{name:8} {t:4d} {kernel:8} {r['eager_ms']:8.3f} {r['host_ms']:8.3f} "
                    f"{r['launches']:6d} {r['cached_ms']:8.3f} {r['graph_ms']:8.3f} "
                    f"{r['graph_cold_ms']:8.3f} {r['train_ms']:8.3f} {r['mlp_ms']:8.3f} "
                    f"{r['floor_ms']:8.3f} "
                    f"{r['eager_x']:8.2f} {r['graph_x']:8.2f} {r['graph_cold_x']:8.2f} "
                    f"{r['replay_rel_err']:8.1e}",
                    flush=True,
                )
                torch.cuda.empty_cache()
                if args.out:  # after every row: a run cut short keeps what it measured
                    with open(args.out, "w") as f:
                        json.dump({"device": dev, "copy_bw": bw, "rows": rows}, f, indent=1)
        del layer


if __name__ == "__main__":
    main()
