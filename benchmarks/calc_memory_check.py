"""Check ``adaptive_moe.calc.training_memory`` against the real peak of a training step.

Builds ``adaptive_moe.training.model.MoETransformer`` on one device, runs a warm-up step (forward,
cross-entropy + router loss backward, AdamW step: this creates the optimizer states), then
measures one more step. Gradients are kept between steps
(``zero_grad(set_to_none=False)``), as DDP keeps them (``--set-to-none``: torch's default,
estimated with ``keep_grads=False``). On CUDA
the peak is ``torch.cuda.max_memory_allocated`` of the measured step; on CPU it is the
allocator trace of ``torch.profiler`` (slow; for small configurations only).

For each configuration it prints the estimate term by term next to what was measured:

    resident     weights + gradients + AdamW states after the warm-up (must be exact)
    activations  bytes of the tensors autograd saves in a forward (saved-tensor hooks)
    peak         the whole step, and the ratio estimate / measured

    python -m benchmarks.calc_memory_check                 # every configuration, on cuda
    python -m benchmarks.calc_memory_check --only fine --dtype fp32
    python -m benchmarks.calc_memory_check --device cpu --only tiny

Exits 1 when a peak ratio falls outside 1 +- ``--tolerance`` (default 0.15).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from adaptive_moe.calc import Parallel, TrainingMemory, TrainSetup, training_memory
from adaptive_moe.runtime.experts.kernels import default_kernel
from adaptive_moe.training.model import ModelConfig, MoETransformer

# name -> (model shape, micro-batch, sequence length)
CONFIGS: dict[str, tuple[ModelConfig, int, int]] = {
    "tiny": (
        ModelConfig(
            vocab_size=256,
            d_model=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            d_ff=128,
            num_experts=4,
            top_k=2,
            moe_d_ff=64,
            max_seq_len=128,
        ),
        4,
        128,
    ),
    "mixtral-like": (
        ModelConfig(
            vocab_size=32000,
            d_model=1024,
            n_layers=4,
            n_heads=16,
            n_kv_heads=4,
            d_ff=3584,
            num_experts=8,
            top_k=2,
            moe_d_ff=3584,
            max_seq_len=2048,
            tie_embeddings=False,
        ),
        4,
        2048,
    ),
    "fine": (
        ModelConfig(
            vocab_size=256,
            d_model=1024,
            n_layers=4,
            n_heads=16,
            n_kv_heads=16,
            d_ff=4096,
            num_experts=64,
            top_k=8,
            moe_d_ff=512,
            moe_every=2,
            max_seq_len=4096,
        ),
        2,
        4096,
    ),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Measured:
    resident: int
    activations: int
    peak: int


def _loss(model: MoETransformer, tokens: torch.Tensor) -> torch.Tensor:
    # The logits are not kept past the loss, so only the fp32 log-probs stay saved.
    logits = model(tokens).flatten(0, 1)  # [B*T, V] fp32
    return F.cross_entropy(logits, tokens.flatten()) + model.router_loss()


def saved_bytes(
    model: torch.nn.Module, fn: Callable[[], object], exclude: Sequence[torch.Tensor] = ()
) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs (parameters,
    buffers and the ``exclude`` tensors, e.g. the inputs, left out)."""
    kept = (*model.parameters(), *model.buffers(), *exclude)
    own = {t.untyped_storage().data_ptr() for t in kept}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        # Not t itself: a saved output would then hold its own grad_fn, a reference cycle
        # through C++ that keeps the whole graph alive for good.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def cpu_step_peak(step) -> int:
    """Peak of the bytes allocated (net) while ``step()`` runs on CPU."""
    prof = torch.profiler
    with prof.profile(activities=[prof.ProfilerActivity.CPU], profile_memory=True) as p:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in p.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure(
    cfg: ModelConfig,
    batch: int,
    seq_len: int,
    dtype: torch.dtype,
    device: torch.device,
    set_to_none: bool = False,
) -> Measured:
    """Resident bytes, saved activations and the peak of one steady-state step (bytes
    beyond what was allocated before the model was built)."""
    gc.collect()  # earlier configs' models may sit in reference cycles
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model = MoETransformer(cfg, device=device).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)

    def step(phases: dict[str, float] | None = None) -> None:
        opt.zero_grad(set_to_none=set_to_none)
        loss = _loss(model, tokens)
        _phase_peak(phases, "forward", device, base)
        loss.backward()
        _phase_peak(phases, "backward", device, base)
        opt.step()
        _phase_peak(phases, "optimizer step", device, base)

    # Counted before the warm-up step: the probe's loss is never back-propagated, so its
    # graph (held by the MoE layers' aux_loss) lives until the next forward replaces it.
    activations = saved_bytes(model, lambda: _loss(model, tokens))
    step()
    states = sum(v.nbytes for st in opt.state.values() for v in st.values() if v.dim())
    resident = sum(p.nbytes + p.grad.nbytes for p in model.parameters()) + states
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        phases: dict[str, float] = {}
        step(phases)
        print(
            "   measured peak by phase: "
            + ", ".join(f"{k} {_mib(v).strip()}" for k, v in phases.items())
        )
        return Measured(resident, activations, max(phases.values()))
    return Measured(resident, activations, resident + cpu_step_peak(step))


def _phase_peak(
    phases: dict[str, float] | None, name: str, device: torch.device, base: int
) -> None:
    """Record the peak since the last phase (CUDA only) and start the next one."""
    if phases is None or device.type != "cuda":
        return
    torch.cuda.synchronize(device)
    phases[name] = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.reset_peak_memory_stats(device)


def estimate(
    cfg: ModelConfig, batch: int, seq_len: int, dtype: str, kernel: str, keep_grads: bool
) -> TrainingMemory:
    setup = TrainSetup(micro_batch=batch, seq_len=seq_len, precision=dtype, keep_grads=keep_grads)
    return training_memory(cfg.calc_spec(), Parallel(expert_kernel=kernel), setup)


def _mib(n: float) -> str:
    return f"{n / (1 << 20):10.1f} MiB"


def report(name: str, est: TrainingMemory, got: Measured) -> float:
    ratio = est.peak / got.peak
    static = est.weights + est.gradients + est.optimizer_states
    print(f"== {name}")
    print(f"   resident     est {_mib(static)}   measured {_mib(got.resident)}")
    print(
        f"   activations  est {_mib(est.activations)}   measured {_mib(got.activations)}"
        f"   (saved tensors)"
    )
    print(
        f"   working      est {_mib(est.working)}   optimizer step temp est "
        f"{_mib(est.optimizer_step)}"
    )
    print(f"   peak         est {_mib(est.peak)}   measured {_mib(got.peak)}   ratio {ratio:.3f}")
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        choices=sorted(CONFIGS),
        action="append",
        help="run this configuration (repeatable; default: all)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument(
        "--set-to-none",
        action="store_true",
        help="zero_grad(set_to_none=True) (torch's default) instead of keeping "
        "gradient buffers between steps",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available (use --device cpu for small configurations)")
    # The expert kernel the layers run by default here decides the row buffers they keep.
    kernel = default_kernel(device, DTYPES[args.dtype])
    failed = []
    for name in args.only or sorted(CONFIGS):
        cfg, batch, seq_len = CONFIGS[name]
        got = measure(cfg, batch, seq_len, DTYPES[args.dtype], device, args.set_to_none)
        est = estimate(cfg, batch, seq_len, args.dtype, kernel, not args.set_to_none)
        ratio = report(name, est, got)
        if abs(ratio - 1) > args.tolerance:
            failed.append(name)
    if failed:
        print(f"outside 1 +- {args.tolerance}: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
