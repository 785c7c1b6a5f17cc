"""A small decoder-only MoE language model built from this package's ``MoELayer``.

    tokens  [B, T]      int64 byte ids (vocab 256)
    x       [B, T, d]   residual stream
    q       [B, H, T, D]    k, v  [B, H_kv, T, D]     D = d / H (head_dim)
    logits  [B, T, V]

Block i: ``x += attn(norm(x)); x += ffn(norm(x))`` (pre-norm, RMSNorm), where attention
is causal with rotary position embeddings (RoPE) and grouped-query heads (H_kv key/value
heads shared by H/H_kv query heads each), and ffn is an ``MoELayer`` on every
``moe_every``-th block (blocks moe_every-1, 2*moe_every-1, ...) and a dense SwiGLU MLP
on the others. A final RMSNorm and an LM head (tied to the embedding or not) follow.

The model knows nothing of data parallelism; only its MoE layers hold a process group
(the expert group), given at construction because their weights are sharded over it.
``reset_parameters(seed)`` draws every weight at its full logical shape from one seeded
generator, so a model is initialised identically whatever the number of ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute

from adaptive_moe.calc import ModelSpec
from adaptive_moe.core.checks import non_negative_int, positive_int
from adaptive_moe.core.config import CompileBackend, check_capacity_factor
from adaptive_moe.runtime.experts.stacked import is_expert_param
from adaptive_moe.runtime.layer import MoELayer
from adaptive_moe.tuning.table import StrategyTable


def _nonnegative(name: str, value: object) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value >= 0):
        raise ValueError(f"ModelConfig.{name} must be a finite number >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the MoE language model; validated at construction.

    Attributes:
        vocab_size: V; 256 for bytes.
        d_model, n_layers: d and the number of blocks.
        n_heads, n_kv_heads: query heads H and key/value heads H_kv (GQA; H_kv | H).
        d_ff: hidden size of the dense SwiGLU MLP of the non-MoE blocks.
        num_experts, top_k, moe_d_ff: E, k and the hidden size of one expert.
        moe_every: expert interval: blocks i with (i + 1) % moe_every == 0 are MoE
            (1: every block; 2: every second block, as in GShard / Switch).
        capacity_factor: ``MoELayer``'s (0 = dropless).
        aux_loss_weight, z_loss_weight: weights of the load-balancing and router z-losses.
        max_seq_len: the longest sequence (size of the RoPE tables).
        tie_embeddings: the LM head reuses the token embedding matrix.
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        init_std: std of the normal initialisation (residual-output projections use
            ``init_std / sqrt(2 * n_layers)``).
        experts_per_layer: DeepSpeed-MoE's PR-MoE: E_i for each of the n_layers blocks
            (0: a dense SwiGLU block), e.g. a pyramid ``(0, 4, 0, 8)``; replaces
            ``moe_every`` (which must stay 1), and ``num_experts`` becomes max E_i.
            Empty: ``num_experts`` on every ``moe_every``-th block.
        shared_experts: always-on experts of hidden size ``moe_d_ff`` on every MoE block,
            summed with the routed output (DeepSpeed-MoE's Residual-MoE is 1 shared
            expert with ``top_k=1``: a dense MLP plus one routed expert as its residual).
        shared_experts_per_layer: per-block shared-expert counts instead (0 on dense
            blocks); empty: ``shared_experts`` everywhere.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 256
    num_experts: int = 4
    top_k: int = 2
    moe_d_ff: int = 128
    moe_every: int = 1
    capacity_factor: float = 0.0
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    max_seq_len: int = 64
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    experts_per_layer: tuple[int, ...] = ()
    shared_experts: int = 0
    shared_experts_per_layer: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self._resolve_per_layer()
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "d_ff",
            "num_experts",
            "top_k",
            "moe_d_ff",
            "moe_every",
            "max_seq_len",
        ):
            positive_int(f"ModelConfig.{name}", getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"ModelConfig head_dim = d_model / n_heads = {self.head_dim} "
                "must be even (RoPE rotates pairs)"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}"
            )
        fewest = min((e for e in self.layer_expert_counts() if e), default=self.num_experts)
        if self.top_k > fewest:
            per_block = " (the fewest experts of any MoE block)" if self.experts_per_layer else ""
            raise ValueError(
                f"ModelConfig.top_k={self.top_k} must be <= num_experts={fewest}{per_block}"
            )
        if self.moe_every > self.n_layers:
            raise ValueError(
                f"ModelConfig.moe_every={self.moe_every} must be <= "
                f"n_layers={self.n_layers} (else no block is MoE)"
            )
        check_capacity_factor(self.capacity_factor, "ModelConfig.capacity_factor")
        for name in ("aux_loss_weight", "z_loss_weight", "init_std"):
            _nonnegative(name, getattr(self, name))
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"ModelConfig.{name} must be a finite number > 0, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(
                f"ModelConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}"
            )

    def _resolve_per_layer(self) -> None:
        """Per-layer tuples as tuples of ints (JSON gives lists); num_experts = max E_i."""
        set_ = object.__setattr__
        from_rule = self.experts_per_layer == () or self.experts_per_layer == []
        for name in ("experts_per_layer", "shared_experts_per_layer"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, tuple | list):
                raise ValueError(f"ModelConfig.{name} must be a sequence of ints, got {value!r}")
            value = tuple(value)
            if value and len(value) != self.n_layers:
                raise ValueError(
                    f"ModelConfig.{name} must have one entry per block "
                    f"(n_layers={self.n_layers}), got {len(value)}"
                )
            for i, n in enumerate(value):
                non_negative_int(f"ModelConfig.{name}[{i}]", n)
            set_(self, name, value)
        non_negative_int("ModelConfig.shared_experts", self.shared_experts)
        if not from_rule:
            if self.moe_every != 1:
                raise ValueError(
                    "ModelConfig.experts_per_layer decides which blocks are MoE; "
                    f"leave moe_every at 1, got {self.moe_every}"
                )
            if not any(self.experts_per_layer):
                raise ValueError("ModelConfig.experts_per_layer has no MoE block (all 0)")
            set_(self, "num_experts", max(self.experts_per_layer))
        if self.shared_experts_per_layer and self.shared_experts:
            raise ValueError(
                "give ModelConfig.shared_experts or shared_experts_per_layer, not both"
            )
        for i, n in enumerate(self.shared_experts_per_layer):
            if n and not self.is_moe_layer(i):
                raise ValueError(
                    f"ModelConfig.shared_experts_per_layer[{i}]={n}: block {i} is dense "
                    f"(shared experts sit beside routed ones)"
                )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, index: int) -> bool:
        """Whether block ``index`` (0-based) has an MoE layer instead of a dense MLP."""
        if self.experts_per_layer:
            return self.experts_per_layer[index] > 0
        return (index + 1) % self.moe_every == 0

    def layer_experts(self, index: int) -> int:
        """E_i of block ``index`` (0 for a dense block)."""
        if self.experts_per_layer:
            return self.experts_per_layer[index]
        return self.num_experts if self.is_moe_layer(index) else 0

    def layer_shared_experts(self, index: int) -> int:
        """Shared experts of block ``index`` (0 for a dense block)."""
        if self.shared_experts_per_layer:
            return self.shared_experts_per_layer[index]
        return self.shared_experts if self.is_moe_layer(index) else 0

    def layer_expert_counts(self) -> tuple[int, ...]:
        return tuple(self.layer_experts(i) for i in range(self.n_layers))

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def calc_spec(self) -> ModelSpec:
        """This model as the calculator describes models (``adaptive_moe.calc``)."""
        return ModelSpec(
            hidden=self.d_model,
            layers=self.n_layers,
            heads=self.n_heads,
            kv_heads=self.n_kv_heads,
            vocab=self.vocab_size,
            ffn=self.d_ff,
            tied_embeddings=self.tie_embeddings,
            num_experts=self.num_experts,
            top_k=self.top_k,
            moe_ffn=self.moe_d_ff,
            expert_interval=self.moe_every,
            experts_per_layer=self.experts_per_layer or None,
            shared_ffn=self.moe_d_ff,
            shared_experts_per_layer=tuple(
                self.layer_shared_experts(i) for i in range(self.n_layers)
            ),
            name="adaptive_moe.training.model",
        )

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**data)  # type: ignore[arg-type]


class Rotary(nn.Module):
    """RoPE tables for positions [0, max_seq_len); rotates the two halves of each head."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, device: torch.device | None):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device).float() / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)  # [S, D/2]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, D] -> same, position t rotated by t * inv_freq."""
        t, half = x.shape[-2], x.shape[-1] // 2
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)  # [T, D/2]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query key/value heads, no biases."""

    def __init__(self, cfg: ModelConfig, device: torch.device | None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False, device=device)
        self.k_proj = nn.Linear(d, kv, bias=False, device=device)
        self.v_proj = nn.Linear(d, kv, bias=False, device=device)
        self.o_proj = nn.Linear(d, d, bias=False, device=device)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q), self.rotary(k)
        gqa = self.n_kv_heads != self.n_heads
        if gqa and q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
            # CUDA's fused SDPA kernels broadcast kv heads only in 16 bits; fp32 with
            # enable_gqa falls back to the math kernel, which keeps the S x S probabilities.
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # [B, H, T, D]
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    """Dense MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, d_ff: int, device: torch.device | None):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False, device=device)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False, device=device)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: attention, then an MoE layer or a dense MLP."""

    def __init__(self, cfg: ModelConfig, ffn: nn.Module, device: torch.device | None):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps, device=device)
        self.attn = Attention(cfg, device)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps, device=device)
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, normed = self.dense_part(x)  # [B, T, d] each
        return h + self.ffn(normed)

    def dense_part(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> (x + attention, its pre-FFN norm): all of the block but the FFN."""
        h = x + self.attn(self.attn_norm(x))
        return h, self.ffn_norm(h)


class MoETransformer(nn.Module):
    """Decoder-only byte LM with MoE blocks (see module docstring).

    Args:
        cfg: the model's shape.
        process_group, ranks_per_node, table, compile_experts: passed to every
            ``MoELayer`` (the expert group, its node size, a strategy table, the compile
            backend of its one-process grouped_mm experts). Building the model is collective
            over ``process_group`` (each MoE layer builds its communication mesh).
        device: where the weights live.
        seed: seeds ``reset_parameters``.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        process_group: dist.ProcessGroup | None = None,
        ranks_per_node: int | None = None,
        table: StrategyTable | None = None,
        compile_experts: CompileBackend | None = None,
        device: torch.device | str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        device = torch.device(device) if device is not None else None
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, device=device)
        blocks = []
        for i in range(cfg.n_layers):
            if cfg.is_moe_layer(i):
                ffn: nn.Module = MoELayer(
                    cfg.d_model,
                    cfg.moe_d_ff,
                    cfg.layer_experts(i),
                    cfg.top_k,
                    capacity_factor=cfg.capacity_factor,
                    shared_d_ff=cfg.layer_shared_experts(i) * cfg.moe_d_ff,
                    process_group=process_group,
                    ranks_per_node=ranks_per_node,
                    table=table,
                    compile_experts=compile_experts,
                    device=device,
                )
            else:
                ffn = SwiGLU(cfg.d_model, cfg.d_ff, device)
            blocks.append(Block(cfg, ffn, device))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps, device=device)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False, device=device)
        )
        self.reset_parameters(seed)

    def moe_layers(self) -> Iterator[MoELayer]:
        """The MoE layers, in block order."""
        for block in self.blocks:
            if isinstance(block.ffn, MoELayer):
                yield block.ffn

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] int64 -> logits [B, T, V] (fp32)."""
        if tokens.dim() != 2 or tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"tokens must be [B, T] with T <= max_seq_len="
                f"{self.cfg.max_seq_len}, got shape {tuple(tokens.shape)}"
            )
        x = self.embed(tokens)  # [B, T, d]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight  # [V, d]
        return F.linear(x, head).float()  # [B, T, V]

    def router_loss(self) -> torch.Tensor:
        """Weighted load-balancing + z-loss of the last forward, summed over MoE layers
        (this rank's share: its mean over ranks is the global batch's loss)."""
        cfg = self.cfg
        total = torch.zeros((), device=self.embed.weight.device)
        for layer in self.moe_layers():
            total = total + cfg.aux_loss_weight * layer.aux_loss + cfg.z_loss_weight * layer.z_loss
        return total

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Draw every weight at its full logical shape from one generator seeded by
        ``seed`` (so the result does not depend on the number of ranks): norms 1, matrices
        N(0, init_std^2), residual-output projections scaled by 1/sqrt(2 * n_layers)."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(seed)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)

        def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
            return torch.randn(shape, generator=gen) * std

        for name, param in self.named_parameters():
            if is_expert_param(param):
                continue  # drawn per layer below, at the full [E, ...] shape
            if "norm" in name:
                param.fill_(1.0)
            else:
                residual_out = name.endswith(("o_proj.weight", "down_proj.weight"))
                param.copy_(normal(tuple(param.shape), out_std if residual_out else cfg.init_std))
        h, d = cfg.moe_d_ff, cfg.d_model
        for layer in self.moe_layers():
            e = layer.router_cfg.num_experts
            layer.load_expert_weights(
                gate_up_proj=normal((e, 2 * h, d), cfg.init_std),  # [E, 2h, d]
                down_proj=normal((e, d, h), out_std),  # [E, d, h]
            )


def wrap_blocks(
    model: MoETransformer, *, compile: bool, checkpoint: bool, backend: str = "inductor"
) -> None:
    """``torch.compile`` and / or activation checkpointing (non-reentrant) per block, in
    place: each block's ``forward`` is replaced, so parameter names, hooks (DDP, FSDP2)
    and checkpoints stay as they are. The compiled forward runs inside the checkpoint,
    so the backward's recomputation replays the compiled block (and each MoE layer the
    strategy its forward chose).

    An MoE block compiles its dense part alone: the MoE layer syncs with the host (the
    per-expert counts) and runs its own kernels, so traced with the block it splits
    into many small graphs whose guards and autograd seams cost more than they fuse
    (on one H100, gpu-1b bf16: 100 ms per step compiled whole against 90 ms eager).
    Its experts compile on their own, on one process, where the model was built with
    ``compile_experts`` (the trainer's ``--compile`` does that)."""
    for block in model.blocks:
        forward = block.forward
        if compile and isinstance(block.ffn, MoELayer):
            block.dense_part = torch.compile(block.dense_part, backend=backend)
        elif compile:
            forward = torch.compile(forward, backend=backend)
        if checkpoint:
            forward = functools.partial(recompute, forward, use_reentrant=False)
        block.forward = forward
