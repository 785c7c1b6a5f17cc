"""``adaptive-moe calc {params,flops,mem}``: the calculator on the command line.

The model comes from ``--preset``, ``--config`` (a transformers ``config.json`` or the
directory ``save_pretrained`` writes) or the shape flags; shape flags given with a preset
or config override its values. Errors are one ``error:`` line on stderr and exit 2; a
reader that closes the pipe early (``| head``) ends the output quietly.

    adaptive-moe calc params --preset mixtral-8x7b
    adaptive-moe calc flops --config path/config.json --tokens 1e12 --device-tflops 800
    adaptive-moe calc flops --preset mixtral-8x7b --mode infer --seq-len 4096 --output-tokens 512
    adaptive-moe calc mem --preset deepseek-v3 --dp 8 --ep 8 --zero 1 --gpu-mem-gib 80
    adaptive-moe calc mem --preset mixtral-8x7b --num-gpus 16 --tp 2 --partition-activations
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

from adaptive_moe.calc import report
from adaptive_moe.calc.flops import (
    CHECKPOINTING,
    MEASURED_BF16_FLOPS,
    RunEstimate,
    forward_flops,
    inference_flops,
    measured_device_flops,
    mfu,
    training_flops_per_token,
)
from adaptive_moe.calc.hf import load_hf_config
from adaptive_moe.calc.memory import (
    ATTENTION_KERNELS,
    DTYPE_BYTES,
    GIB,
    OPTIMIZERS,
    PRECISIONS,
    InferSetup,
    Parallel,
    TrainSetup,
    inference_memory,
    training_memory,
)
from adaptive_moe.calc.model import NORM_KINDS, ModelSpec
from adaptive_moe.calc.params import count_params
from adaptive_moe.calc.presets import PRESETS
from adaptive_moe.core import cli_types as arg
from adaptive_moe.core.strategy import KERNELS

# flag -> ModelSpec field, for the shape flags that map one to one.
_SHAPE_FLAGS: dict[str, str] = {
    "layers": "layers",
    "hidden": "hidden",
    "heads": "heads",
    "kv_heads": "kv_heads",
    "head_dim": "head_dim",
    "vocab": "vocab",
    "tied_embeddings": "tied_embeddings",
    "position_embeddings": "position_embeddings",
    "norm": "norm",
    "ffn": "ffn",
    "glu": "glu",
    "experts": "num_experts",
    "top_k": "top_k",
    "moe_ffn": "moe_ffn",
    "expert_interval": "expert_interval",
    "first_dense_layers": "first_dense_layers",
    "shared_experts": "shared_experts",
    "shared_ffn": "shared_ffn",
}
_REQUIRED = ("layers", "hidden", "heads", "vocab")


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (a preset, a config.json, or the shape flags)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="a named model")
    src.add_argument("--config", metavar="PATH", help="a transformers config.json")
    g.add_argument("--layers", type=arg.layer_count, help="transformer blocks L")
    g.add_argument("--hidden", type=arg.positive_int, help="hidden size d")
    g.add_argument("--heads", type=arg.positive_int, help="attention heads H")
    g.add_argument("--kv-heads", type=arg.positive_int, help="key/value heads (GQA/MQA; default H)")
    g.add_argument("--head-dim", type=arg.positive_int, help="head size (default d/H)")
    g.add_argument("--vocab", type=arg.positive_int, help="vocabulary size V")
    g.add_argument(
        "--position-embeddings",
        type=arg.non_negative_int,
        help="rows of a learned position table (GPT-2's n_positions; default 0: RoPE)",
    )
    g.add_argument("--norm", choices=NORM_KINDS, help="rmsnorm (default) or layernorm (+ bias)")
    g.add_argument(
        "--tied-embeddings",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="LM head shares the embedding matrix",
    )
    ffn = g.add_mutually_exclusive_group()
    ffn.add_argument("--ffn", type=arg.positive_int, help="dense FFN hidden size f")
    ffn.add_argument("--ffn-mult", type=arg.positive_float, help="f as a multiple of d")
    mlp = g.add_mutually_exclusive_group()
    mlp.add_argument(
        "--glu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gated FFN (SwiGLU: 3 linears; default) or plain (2)",
    )
    mlp.add_argument("--mlp-linears", type=int, choices=(2, 3), help="linears per FFN")
    g.add_argument("--experts", type=arg.non_negative_int, help="routed experts E (0: dense)")
    g.add_argument("--top-k", type=arg.positive_int, help="routed experts per token k")
    g.add_argument("--moe-ffn", type=arg.positive_int, help="expert hidden size (default f)")
    g.add_argument("--expert-interval", type=arg.positive_int, help="MoE every n-th block")
    g.add_argument(
        "--first-dense-layers", type=arg.non_negative_int, help="leading blocks kept dense"
    )
    g.add_argument("--shared-experts", type=arg.non_negative_int, help="always-on experts")
    g.add_argument("--shared-ffn", type=arg.positive_int, help="hidden size of one shared expert")
    g.add_argument(
        "--experts-per-layer",
        type=arg.non_negative_int_list,
        metavar="E0,E1,...",
        help="routed experts of each layer, 0 for dense (PR-MoE pyramid); replaces "
        "--experts, --expert-interval and --first-dense-layers",
    )
    g.add_argument(
        "--shared-experts-per-layer",
        type=arg.non_negative_int_list,
        metavar="N0,N1,...",
        help="shared (residual) experts of each layer, MoE layers only",
    )


def _add_flops(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("FLOPs and time")
    g.add_argument(
        "--mode",
        choices=("train", "infer"),
        default="train",
        help="infer: prefill of --seq-len prompt tokens + --output-tokens generated",
    )
    g.add_argument(
        "--seq-len", type=arg.positive_int, default=4096, help="sequence (infer: prompt) length"
    )
    g.add_argument(
        "--output-tokens",
        type=arg.non_negative_int,
        default=0,
        help="infer: tokens generated per sequence after the prompt",
    )
    g.add_argument("--batch", type=arg.positive_int, default=1, help="infer: sequences")
    g.add_argument("--tokens", type=arg.positive_float, help="training tokens (e.g. 1e12)")
    g.add_argument(
        "--checkpointing",
        choices=CHECKPOINTING,
        default="none",
        help="full: every block's forward is recomputed in the backward",
    )
    g.add_argument(
        "--device-tflops",
        type=arg.positive_float,
        help="dense bf16 TFLOP/s of one GPU",
    )
    g.add_argument(
        "--device",
        choices=sorted(MEASURED_BF16_FLOPS),
        help="a GPU whose bf16 rate this project measured (instead of --device-tflops)",
    )
    g.add_argument("--gpus", type=arg.positive_int, default=1, help="GPUs in the run")
    g.add_argument(
        "--mfu",
        type=arg.positive_float,
        default=0.4,
        help="model-FLOPs utilisation assumed for the time estimate",
    )
    g.add_argument(
        "--tokens-per-second",
        type=arg.positive_float,
        help="measured training throughput over all GPUs, to report its MFU",
    )


def _add_mem(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallel layout")
    g.add_argument("--mode", choices=("train", "infer"), default="train")
    g.add_argument(
        "--dp", type=arg.positive_int, help="data-parallel degree (default 1, or from --num-gpus)"
    )
    g.add_argument(
        "--num-gpus", type=arg.positive_int, help="GPUs in all: dp = num_gpus / (tp * pp)"
    )
    for flag, text in (
        ("--tp", "tensor-parallel"),
        ("--pp", "pipeline-parallel"),
        ("--ep", "expert-parallel (within DP)"),
    ):
        g.add_argument(flag, type=arg.positive_int, default=1, help=f"{text} degree")
    g.add_argument(
        "--partition-activations",
        "--sequence-parallel",
        action="store_true",
        help="split the d-wide activations over TP too (Megatron sequence parallelism, "
        "DeepSpeed partition_activations)",
    )
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="ZeRO stage")
    g.add_argument(
        "--zero3-live-params",
        type=arg.positive_int,
        help="ZeRO-3: parameters kept gathered at most (DeepSpeed stage3_max_live_parameters)",
    )
    g.add_argument(
        "--misc-mem-gib",
        type=arg.non_negative_gib,
        default=0.0,
        help="fixed extra memory per GPU (CUDA context, NCCL, fragmentation)",
    )
    g.add_argument(
        "--expert-r",
        type=arg.non_negative_int,
        default=1,
        help="expert strategy r: 0 gathers all experts, 1 EP, up to ep/E EP+MP",
    )
    g.add_argument(
        "--expert-kernel",
        choices=KERNELS,
        default="scatter",
        help="expert-compute kernel (decides the row buffers kept)",
    )
    g.add_argument("--gpu-mem-gib", type=arg.gib, default=80.0, help="memory per GPU")
    g.add_argument("--seq-len", type=arg.positive_int, default=4096, help="sequence length")
    t = p.add_argument_group("training (--mode train)")
    t.add_argument("--micro-batch", type=arg.positive_int, default=1, help="sequences per GPU")
    t.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    t.add_argument(
        "--optimizer-states",
        choices=tuple(DTYPE_BYTES),
        help="dtype of optimizer states (default fp32; bf16 with --precision bf16)",
    )
    t.add_argument(
        "--grad-dtype",
        choices=tuple(DTYPE_BYTES),
        help="dtype of gradients (default: the parameter dtype)",
    )
    t.add_argument(
        "--weight-bytes",
        type=arg.positive_float,
        help="bytes per weight value, any number (default: --precision in training, "
        "--weight-dtype in inference)",
    )
    t.add_argument(
        "--grad-bytes", type=arg.positive_float, help="bytes per gradient value (vs --grad-dtype)"
    )
    t.add_argument(
        "--state-bytes",
        type=arg.positive_float,
        help="bytes per optimizer-state value, e.g. 1 for 8-bit Adam (vs --optimizer-states)",
    )
    t.add_argument("--checkpointing", choices=CHECKPOINTING, default="none")
    t.add_argument(
        "--attention",
        choices=ATTENTION_KERNELS,
        default="fused",
        help="SDPA kernel: fused (flash / memory-efficient) or math (keeps S x S)",
    )
    t.add_argument(
        "--keep-grads",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gradient buffers live through the step (DDP, FSDP); --no-keep-grads for "
        "zero_grad(set_to_none=True) in a plain loop",
    )
    t.add_argument(
        "--capacity-factor",
        type=float,
        default=1.0,
        help="routed rows on the busiest rank relative to balance (>= 1)",
    )
    i = p.add_argument_group("inference (--mode infer)")
    i.add_argument("--batch", type=arg.positive_int, default=1, help="sequences in the KV cache")
    i.add_argument("--weight-dtype", choices=tuple(DTYPE_BYTES), default="bf16")
    i.add_argument("--kv-dtype", choices=tuple(DTYPE_BYTES), default="bf16")
    i.add_argument(
        "--output-tokens",
        type=arg.non_negative_int,
        default=0,
        help="tokens generated per sequence: the KV cache holds prompt + output",
    )
    i.add_argument(
        "--kv-bytes", type=arg.positive_float, help="bytes per KV-cache value (vs --kv-dtype)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``params``, ``flops`` and ``mem`` with their flags on ``parser``."""
    sub = parser.add_subparsers(dest="calc_command", metavar="WHAT", required=True)
    for name, help_text, extra in (
        ("params", "parameters by component, total and active per token", None),
        ("flops", "FLOPs per token, for a training run, and its time", _add_flops),
        ("mem", "memory per GPU for training or inference, and whether it fits", _add_mem),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_model(p)
        if extra is not None:
            extra(p)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def model_from_args(args: argparse.Namespace) -> ModelSpec:
    """The ``ModelSpec`` the flags describe; ``ValueError`` when they do not describe one."""
    base = None
    if args.preset:
        base = PRESETS[args.preset]
    elif args.config:
        base = load_hf_config(args.config, "--config")
    shape = {field: getattr(args, flag) for flag, field in _SHAPE_FLAGS.items()}
    if args.mlp_linears is not None:
        shape["glu"] = args.mlp_linears == 3
    if args.ffn_mult is not None:
        hidden = args.hidden or (base.hidden if base else None)
        if hidden is None:
            raise ValueError("--ffn-mult needs --hidden")
        shape["ffn"] = round(args.ffn_mult * hidden)
    overrides = {k: v for k, v in shape.items() if v is not None}
    if args.experts_per_layer is not None:
        # The tuple decides which layers are MoE: the uniform rule's fields go back to
        # their defaults unless given here too (then ModelSpec names the conflict).
        rule = {"num_experts": 0, "expert_interval": 1, "first_dense_layers": 0}
        overrides = {**rule, "dense_layer_ids": (), **overrides}
        overrides["experts_per_layer"] = args.experts_per_layer
    if args.shared_experts_per_layer is not None:
        overrides.setdefault("shared_experts", 0)
        overrides["shared_experts_per_layer"] = args.shared_experts_per_layer
    if base is not None:
        reshaped = {"hidden", "heads"} & overrides.keys()
        if reshaped and "head_dim" not in overrides and base.head_dim == base.hidden // base.heads:
            # The base's head size was derived (d / H): derive it again from the new shape.
            # An explicit one (Qwen3: 128 with d / H = 64) is the model's and stays.
            overrides["head_dim"] = None
        return dataclasses.replace(base, **overrides)
    missing = [f"--{f.replace('_', '-')}" for f in (*_REQUIRED, "ffn") if f not in overrides]
    if missing:
        raise ValueError(
            f"without --preset or --config the model needs {', '.join(missing)} "
            f"(--ffn or --ffn-mult)"
        )
    return ModelSpec(**overrides)


def _device_flops(args: argparse.Namespace) -> float | None:
    """The rate to estimate with: --device-tflops, else --device's measured rate. The
    calculator imports no torch, so it does not probe the local GPU."""
    if args.device_tflops is not None:
        return args.device_tflops * 1e12
    if args.device is not None:
        return measured_device_flops(args.device)
    return None


def _params(spec: ModelSpec, args: argparse.Namespace) -> tuple[dict, str]:
    count = count_params(spec)
    title = f"Parameters: {spec.name}"
    footer = []
    if spec.mtp_layers:
        footer.append(f"{spec.mtp_layers} multi-token-prediction module(s) excluded")
    return count.to_dict(), report.render(title, report.params_rows(count), footer)


def _inference_flops(spec: ModelSpec, args: argparse.Namespace) -> tuple[dict, str]:
    inf = inference_flops(spec, args.seq_len, args.output_tokens, args.batch)
    title = (
        f"Inference FLOPs: {spec.name}, batch {inf.batch} x ({inf.prompt_tokens} prompt + "
        f"{inf.output_tokens} generated) tokens"
    )
    footer = [
        "prefill: the prompt at once, logits of its last position; decode: one token at a "
        "time against the KV cache (the last token is never fed back)"
    ]
    return inf.to_dict(), report.render(title, report.inference_flops_rows(inf), footer)


def _flops(spec: ModelSpec, args: argparse.Namespace) -> tuple[dict, str]:
    if args.mode == "infer":
        return _inference_flops(spec, args)
    fwd = forward_flops(spec, args.seq_len)
    train = training_flops_per_token(spec, args.seq_len, args.checkpointing)
    payload: dict = {
        "forward_per_token": fwd.to_dict(),
        "training_per_token": train,
        "seq_len": args.seq_len,
        "checkpointing": args.checkpointing,
    }
    rows = report.flops_rows(fwd, train, args.tokens)
    footer = ["attention counted over the full S x S square (what masked SDPA computes)"]
    if args.tokens is not None:
        payload["training_flops"] = train * args.tokens
    rate = _device_flops(args)
    if rate is None:
        footer.append("time and MFU: give --device-tflops or --device")
    if rate is not None and args.tokens is not None:
        estimate = RunEstimate(train * args.tokens, args.gpus, rate, args.mfu)
        payload["seconds"] = estimate.seconds
        rows.append(report.time_row(estimate))
    if rate is not None and args.tokens_per_second is not None:
        payload["mfu"] = mfu(train, args.tokens_per_second, args.gpus, rate)
        rows.append(report.mfu_row(payload["mfu"], rate, args.gpus))
    title = f"FLOPs: {spec.name}, seq_len {args.seq_len}, checkpointing {args.checkpointing}"
    return payload, report.render(title, rows, footer)


def _parallel(args: argparse.Namespace) -> Parallel:
    fields = dict(
        tp=args.tp,
        pp=args.pp,
        ep=args.ep,
        zero_stage=args.zero,
        expert_r=args.expert_r,
        expert_kernel=args.expert_kernel,
        sequence_parallel=args.partition_activations,
        zero3_live_params=args.zero3_live_params,
    )
    if args.num_gpus is None:
        return Parallel(dp=args.dp or 1, **fields)
    par = Parallel.for_gpus(args.num_gpus, **fields)
    if args.dp is not None and args.dp != par.dp:
        raise ValueError(
            f"--dp {args.dp} disagrees with --num-gpus {args.num_gpus} / (tp*pp = "
            f"{args.tp * args.pp}) = {par.dp}; give one of them"
        )
    return par


def _mem(spec: ModelSpec, args: argparse.Namespace) -> tuple[dict, str]:
    par = _parallel(args)
    misc = round(args.misc_mem_gib * GIB)
    if args.mode == "train":
        setup = TrainSetup(
            micro_batch=args.micro_batch,
            seq_len=args.seq_len,
            precision=args.precision,
            optimizer=args.optimizer,
            optimizer_states=args.optimizer_states,
            grad_dtype=args.grad_dtype,
            checkpointing=args.checkpointing,
            capacity_factor=args.capacity_factor,
            keep_grads=args.keep_grads,
            attention=args.attention,
            weight_value_bytes=args.weight_bytes,
            grad_value_bytes=args.grad_bytes,
            state_value_bytes=args.state_bytes,
            misc_bytes=misc,
        )
        mem = training_memory(spec, par, setup)
        rows = report.training_rows(mem, par.pp)
        what = f"training, micro-batch {setup.micro_batch} x {setup.seq_len} tokens"
    else:
        setup = InferSetup(
            batch=args.batch,
            seq_len=args.seq_len,
            weight_dtype=args.weight_dtype,
            kv_dtype=args.kv_dtype,
            output_tokens=args.output_tokens,
            weight_value_bytes=args.weight_bytes,
            kv_value_bytes=args.kv_bytes,
            misc_bytes=misc,
        )
        mem = inference_memory(spec, par, setup)
        rows = report.inference_rows(mem, par.pp)
        what = f"inference, batch {setup.batch} x {setup.seq_len} tokens"
        if setup.output_tokens:
            what += f" + {setup.output_tokens} generated"
    fits = mem.fits(args.gpu_mem_gib)
    payload = {
        **mem.to_dict(),
        "mode": args.mode,
        "layout": dataclasses.asdict(par),
        "setup": dataclasses.asdict(setup),
        "gpu_mem_gib": args.gpu_mem_gib,
        "fits": fits,
    }
    title = f"Memory per GPU: {spec.name}, {what}, {report.layout_text(par)}"
    return payload, report.render(title, rows, [report.fits_line(mem.peak, args.gpu_mem_gib)])


_COMMANDS = {"params": _params, "flops": _flops, "mem": _mem}


_TOO_LARGE = "the sizes given are too large to compute with: choose smaller ones"


def _check_finite(where: str, value: object) -> None:
    """ValueError naming the first result that overflowed to inf or NaN."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(f"{where}.{key}", item)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_finite(f"{where}[{i}]", item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{_TOO_LARGE} ({where} is {value})")


def run(args: argparse.Namespace) -> int:
    """Print the chosen calculation; 2 (with a message) when the flags are inconsistent."""
    try:
        spec = model_from_args(args)
        try:
            payload, text = _COMMANDS[args.calc_command](spec, args)
        except OverflowError as err:  # an int beyond a float's range, met on the way
            raise ValueError(f"{_TOO_LARGE} ({err})") from None
        _check_finite(args.calc_command, payload)
    except ValueError as err:
        print(f"adaptive-moe calc {args.calc_command}: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        text = json.dumps({"model": report.spec_dict(spec), args.calc_command: payload}, indent=2)
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # The reader stopped early (``| head``): what it wanted was printed. Point stdout
        # at /dev/null so that the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0
