"""Fine-tune a transformers MoE model with adaptive_moe: wrap, profile, train, export.

    python examples/finetune_transformers.py                        # one process (CPU / 1 GPU)
    python examples/finetune_transformers.py --nproc 2              # 2 spawned gloo CPU ranks
    torchrun --nproc-per-node 8 examples/finetune_transformers.py   # 8 GPUs (NCCL)

1. Build a small model of the chosen family from its config (random weights, nothing is
   downloaded), identical on every rank (same seed).
2. ``adaptive_moe.wrap``: every MoE block becomes an ``MoELayer``; each rank keeps only
   its shard of the expert weights.
3. Profile: one strategy table per distinct MoE layer shape, handed to the layers.
4. Fine-tune on a synthetic next-token task (each sequence counts up with its own stride,
   so the model must read the stride from the context). Every layer looks its strategy
   up in the table on every step from the routing it sees: automatic switching. Dense
   gradients are averaged over the ranks; expert gradients arrive reduced in their shard.
5. ``adaptive_moe.unwrap``, ``save_pretrained``, reload with plain transformers
   (``AutoModelForCausalLM.from_pretrained``) and check that the reloaded model's logits
   equal the wrapped model's. Exit status 1 if they do not.

Needs the optional extra: ``pip install 'adaptive_moe[transformers]'``.
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

import adaptive_moe as am
from adaptive_moe.core.launch import external_world_size, launch
from adaptive_moe.integrations.transformers import WrappedMoEBlock
from adaptive_moe.profiling.profiler import profile_layer, summary
from adaptive_moe.runtime.experts import is_expert_param

VOCAB = 128
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "mixtral": (
        "MixtralConfig",
        dict(intermediate_size=128, num_local_experts=8, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            intermediate_size=128,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=128,
            num_experts=8,
            num_experts_per_tok=2,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            intermediate_size=128,
            moe_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=16,
        ),
    ),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=64, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=16,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
        ),
    ),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Relative tolerance of the export check: the reloaded model runs the original per-expert
# loop, the wrapped one adaptive_moe's kernels; only rounding may differ.
_EXPORT_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="mixtral")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--buckets", type=int, default=4, help="workload buckets to profile")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per strategy and bucket")
    p.add_argument(
        "--nproc", type=int, default=1, help="ranks to spawn on CPU when not under torchrun"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to save the exported model (default: a temporary directory)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("steps", "batch", "seq", "nproc", "buckets", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def build_model(family: str, dtype: torch.dtype, device: torch.device, seed: int):
    cls_name, fields = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**_COMMON, **fields})
    torch.manual_seed(seed)  # every rank builds the same weights
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device)


def synthetic_batch(rows: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """[rows, seq] token ids: start + stride * position (mod V), stride per sequence."""
    start = torch.randint(0, VOCAB, (rows, 1), generator=gen)
    stride = torch.randint(1, 8, (rows, 1), generator=gen)
    return (start + stride * torch.arange(seq)) % VOCAB


def moe_layers(model) -> list[am.MoELayer]:
    return [m.moe for m in model.modules() if isinstance(m, WrappedMoEBlock)]


def profile(model, args: argparse.Namespace, rank: int) -> None:
    """One table per distinct layer shape, measured on the first layer of that shape."""
    by_shape = collections.defaultdict(list)
    for layer in moe_layers(model):
        by_shape[layer.layer_shape()].append(layer)
    for shape, layers in by_shape.items():
        table = profile_layer(
            layers[0],
            args.batch * args.seq,
            num_buckets=args.buckets,
            repeats=args.repeats,
            warmup=2,
            progress=rank == 0 and sys.stderr.isatty(),
        )
        for layer in layers:
            layer.use_table(table)
        if rank == 0:
            print(f"strategy table for {shape.label()} ({len(layers)} layers):")
            print(summary(table, layers[0].default_strategy))


def strategy_counts(model) -> collections.Counter:
    """Forwards run per strategy, summed over the MoE layers."""
    ran = collections.Counter()
    for layer in moe_layers(model):
        for strategy, stat in layer.stats().items():
            ran[str(strategy)] += int(stat["count"])
    return ran


def average_gradients(model, world: int) -> None:
    """Data parallel: mean gradient of the ranks' losses. Expert shards already hold the
    sum over ranks (their all-to-all backward brings every rank's rows)."""
    if world == 1:
        return
    for p in model.parameters():
        if p.grad is None:
            continue
        if not is_expert_param(p):
            dist.all_reduce(p.grad)
        p.grad.div_(world)


def train(model, args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)  # after wrap: holds the shards
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank + 1)  # each rank its data
    model.train()
    profiled = strategy_counts(model)  # forwards before training (the wrap check)
    started = time.perf_counter()
    # With router logits recorded, the loss includes the model's load-balancing loss
    # (models whose config has no such option, e.g. DeepSeek-V3, have none).
    aux = {"output_router_logits": True} if hasattr(model.config, "output_router_logits") else {}
    for step in range(1, args.steps + 1):
        ids = synthetic_batch(args.batch, args.seq, gen).to(device)
        out = model(ids, labels=ids, **aux)
        out.loss.backward()
        average_gradients(model, world)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0 and (step == 1 or step % 50 == 0 or step == args.steps):
            print(
                f"step {step:4d}  loss {out.loss.item():.3f}  "
                f"({time.perf_counter() - started:.1f} s)",
                flush=True,
            )
    if rank == 0:
        ran = strategy_counts(model) - profiled
        print(
            "strategies the layers picked while training (forwards, all layers): "
            + ", ".join(f"{s} x{n}" for s, n in ran.most_common())
        )


def export_and_check(
    model, args: argparse.Namespace, rank: int, device: torch.device, dtype: torch.dtype
) -> bool:
    """Unwrap, save, reload with plain transformers and compare logits (on rank 0)."""
    eval_ids = synthetic_batch(4, args.seq, torch.Generator().manual_seed(12345)).to(device)
    model.eval()
    with torch.no_grad():
        wrapped_logits = model(eval_ids).logits.float()
    am.unwrap(model)  # collective: gathers the full expert tensors
    if rank != 0:
        return True
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        model.save_pretrained(out)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
        with torch.no_grad():
            logits = reloaded.to(device).eval()(eval_ids).logits.float()
    err = ((logits - wrapped_logits).abs().max() / wrapped_logits.abs().max()).item()
    ok = math.isfinite(err) and err <= _EXPORT_TOL[dtype]
    print(
        f"exported to {args.out or '(temporary directory)'}; reloaded with plain "
        f"transformers: max relative logit difference {err:.2e} "
        f"({'ok' if ok else 'MISMATCH'}, tolerance {_EXPORT_TOL[dtype]:.0e})"
    )
    return ok


def run(rank: int, world: int, args: argparse.Namespace) -> bool:
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    dtype = _DTYPES[args.dtype]
    model = build_model(args.family, dtype, device, args.seed)
    am.wrap(model)
    if rank == 0:
        layers = moe_layers(model)
        print(
            f"{args.family}: wrapped {len(layers)} MoE blocks on {world} rank(s); rank 0 "
            f"stores experts {list(layers[0].local_experts)}, hidden "
            f"{layers[0].local_hidden.start}:{layers[0].local_hidden.stop}"
        )
    profile(model, args, rank)
    train(model, args, rank, world, device)
    return export_and_check(model, args, rank, device, dtype)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = external_world_size() or args.nproc
    if world == 1 and external_world_size() is None:
        ok = [run(0, 1, args)]
    else:
        ok = launch(run, world, (args,), timeout_s=1800)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
