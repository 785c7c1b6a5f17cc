"""Reading a transformers-5 MoE block as data, and checking the reading numerically.

Every supported block has the transformers-5 experts layout (notation in ``config``):

    block.gate            router (or .router): weight [E, d], top_k; forward(x [T, d])
                          returns (logits [T, E], weights [T, k], ids [T, k])
    block.experts         gate_up_proj [E, 2h, d] (gate rows first), down_proj [E, d, h],
                          act_fn; expert e computes down_e(act(gate_e x) * up_e x)
    block.shared_experts  optional always-on MLP (gate_proj / up_proj / down_proj
      or .shared_expert   nn.Linear, no bias), hidden size h_s
    block.shared_expert_gate  optional nn.Linear(d, 1): the shared output is scaled by
                          sigmoid(shared_expert_gate(x)) (Qwen2-MoE)

    output = sum_j weights[:, j] * expert_{ids[:, j]}(x) + [sigmoid(g(x)) *] shared(x)

Families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and the other models built on
this layout) differ only in their router's attributes, which ``_ROUTER_FIELDS`` maps onto
``RouterConfig`` fields; a router with an ``e_score_correction_bias`` buffer scores with a
sigmoid (DeepSeek-V3 style), any other with a softmax. One reading for all of them, no
code per model. The reading is
not taken on trust: ``check_block`` runs the block's own router against adaptive_moe's
router, and the whole block against a per-expert reference built from the reading, on a
few random tokens. A block that fails either check is reported, never wrapped.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn

from adaptive_moe.core.activations import ACTIVATION_FNS
from adaptive_moe.core.checks import is_int
from adaptive_moe.core.config import ACTIVATIONS, Activation, RouterConfig, ScoreFunc
from adaptive_moe.core.config_values import config_bool, config_float, config_int
from adaptive_moe.runtime.routing.router import Router

# Child names, in the order tried.
ROUTER_NAMES = ("gate", "router")
SHARED_NAMES = ("shared_experts", "shared_expert")
SHARED_GATE_NAMES = ("shared_expert_gate",)
BIAS_NAME = "e_score_correction_bias"
# The sharded tensors: the same names in the block and in the MoELayer.
EXPERT_TENSORS = ("experts.gate_up_proj", "experts.down_proj")

# RouterConfig field -> (router attributes that hold it, value when none is present).
# Mixtral's router has no norm_topk_prob and always renormalises, hence the default.
_ROUTER_FIELDS: dict[str, tuple[tuple[str, ...], object]] = {
    "renormalize": (("norm_topk_prob",), True),
    "num_groups": (("num_group", "n_group"), 1),
    "topk_groups": (("topk_group",), 1),
    "routed_scaling_factor": (("routed_scaling_factor",), 1.0),
}

_MOE_CLASS_NAME = re.compile(r"moe|mixture|expert", re.IGNORECASE)
_CHECK_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What one transformers MoE block computes, as ``MoELayer`` arguments.

    Attributes:
        class_name: the block's class, for messages.
        router: the name of the block's router child.
        d_model, d_ff, num_experts, top_k, activation: the routed experts.
        score_func, renormalize, num_groups, topk_groups, routed_scaling_factor,
            score_correction_bias: the router's selection rule.
        shared_d_ff: hidden size of the shared MLP, 0 when there is none.
        shared_gate: the shared MLP's output is scaled by a sigmoid gate.
        names: (name in the block's state dict, name in the MoELayer's state dict) for
            every tensor of the block; the two expert tensors are sharded, the rest copied.
        dtype, device: of the block's expert weights.
    """

    class_name: str
    router: str
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    activation: Activation
    score_func: ScoreFunc
    renormalize: bool
    num_groups: int
    topk_groups: int
    routed_scaling_factor: float
    score_correction_bias: bool
    shared_d_ff: int
    shared_gate: bool
    names: tuple[tuple[str, str], ...]
    dtype: torch.dtype
    device: torch.device

    def router_config(self) -> RouterConfig:
        return RouterConfig(
            num_experts=self.num_experts,
            top_k=self.top_k,
            score_func=self.score_func,
            renormalize=self.renormalize,
            top1_gate="one",
            num_groups=self.num_groups,
            topk_groups=self.topk_groups,
            routed_scaling_factor=self.routed_scaling_factor,
            score_correction_bias=self.score_correction_bias,
        )

    def layer_kwargs(self) -> dict[str, object]:
        """Keyword arguments of ``MoELayer`` (without the distributed ones)."""
        return {
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "glu": True,
            "activation": self.activation,
            "bias": False,
            "capacity_factor": 0.0,
            "renormalize": self.renormalize,
            "top1_gate": "one",  # transformers renormalises a single weight to 1 too
            "score_func": self.score_func,
            "num_groups": self.num_groups,
            "topk_groups": self.topk_groups,
            "routed_scaling_factor": self.routed_scaling_factor,
            "score_correction_bias": self.score_correction_bias,
            "shared_d_ff": self.shared_d_ff,
            "shared_gate": self.shared_gate,
            "dtype": self.dtype,
            "device": self.device,
        }


def looks_like_moe(module: nn.Module) -> bool:
    """A module with an ``experts`` child, or an MoE-named one with a router child."""
    children = dict(module.named_children())
    if "experts" in children:
        return True
    named_moe = _MOE_CLASS_NAME.search(type(module).__name__) is not None
    return named_moe and any(name in children for name in ROUTER_NAMES)


def read_block(block: nn.Module) -> BlockSpec:
    """Read a transformers-5 MoE block; ValueError saying what does not fit otherwise."""
    router_name, router = _router(block)
    w1, w2 = _expert_weights(block)
    num_experts, d_model, d_ff = w1.shape[0], w1.shape[2], w2.shape[2]
    top_k = _router_top_k(router_name, router, num_experts, d_model)
    if (
        config_float(
            type(block).__name__, "jitter_noise", getattr(block, "jitter_noise", 0.0) or 0.0
        )
        > 0
    ):
        raise ValueError(f"router jitter noise {block.jitter_noise} is not supported; set it to 0")
    activation = identify_activation(getattr(block.experts, "act_fn", None), "experts.act_fn")
    has_bias = isinstance(getattr(router, BIAS_NAME, None), torch.Tensor)
    names = [(f"{router_name}.weight", "router.weight")]
    if has_bias:
        names.append((f"{router_name}.{BIAS_NAME}", f"router.{BIAS_NAME}"))
    names += [(n, n) for n in EXPERT_TENSORS]
    shared_d_ff, shared_gate = _read_shared(block, d_model, activation, names)
    unknown = sorted(set(block.state_dict()) - {theirs for theirs, _ in names})
    if unknown:
        raise ValueError(f"has tensors adaptive_moe does not know how to carry: {unknown}")
    fields = {f: _router_attr(router, *how) for f, how in _ROUTER_FIELDS.items()}
    return BlockSpec(
        class_name=type(block).__name__,
        router=router_name,
        d_model=d_model,
        d_ff=d_ff,
        num_experts=num_experts,
        top_k=top_k,
        activation=activation,
        score_func="sigmoid" if has_bias else "softmax",
        renormalize=config_bool(router_name, "norm_topk_prob", fields["renormalize"]),
        num_groups=config_int(router_name, "n_group", fields["num_groups"], least=1),
        topk_groups=config_int(router_name, "topk_group", fields["topk_groups"], least=1),
        routed_scaling_factor=config_float(
            router_name, "routed_scaling_factor", fields["routed_scaling_factor"]
        ),
        score_correction_bias=has_bias,
        shared_d_ff=shared_d_ff,
        shared_gate=shared_gate,
        names=tuple(names),
        dtype=w1.dtype,
        device=w1.device,
    )


def identify_activation(fn: object, where: str) -> Activation:
    """Which of silu / gelu / relu ``fn`` computes (checked on a grid of values)."""
    if not callable(fn):
        raise ValueError(f"{where} is missing")
    grid = torch.linspace(-6.0, 6.0, 121)
    with torch.no_grad():
        got = fn(grid)
    for name, ref in ACTIVATION_FNS.items():
        if isinstance(got, torch.Tensor) and torch.allclose(got, ref(grid), rtol=0, atol=1e-6):
            return name  # type: ignore[return-value]
    raise ValueError(f"{where} ({type(fn).__name__}) is none of the supported {ACTIVATIONS}")


def _first_child(block: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(block, n, None), nn.Module)), None)


def _router(block: nn.Module) -> tuple[str, nn.Module]:
    name = _first_child(block, ROUTER_NAMES)
    if name is None:
        raise ValueError(f"has no router child (looked for {', '.join(ROUTER_NAMES)})")
    return name, getattr(block, name)


def _expert_weights(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up_proj [E, 2h, d] and down_proj [E, d, h] of ``block.experts``."""
    experts = getattr(block, "experts", None)
    params = dict(experts.named_parameters()) if isinstance(experts, nn.Module) else {}
    w1, w2 = params.pop("gate_up_proj", None), params.pop("down_proj", None)
    if w1 is None or w2 is None or w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"experts ({type(experts).__name__}) has no stacked 3-D gate_up_proj / down_proj "
            f"parameters (the transformers-5 experts layout)"
        )
    if params:
        raise ValueError(f"experts has parameters adaptive_moe does not carry: {sorted(params)}")
    e, rows, d = w1.shape
    if rows % 2 or tuple(w2.shape) != (e, d, rows // 2):
        raise ValueError(
            f"experts.gate_up_proj {tuple(w1.shape)} and down_proj {tuple(w2.shape)} are not "
            f"[E, 2h, d] and [E, d, h]"
        )
    if w1.is_meta:
        raise ValueError("has its expert weights on the meta device; load the weights first")
    return w1, w2


def _router_top_k(name: str, router: nn.Module, num_experts: int, d_model: int) -> int:
    """The router's k, after checking its weight is [E, d]."""
    weight = getattr(router, "weight", None)
    if not isinstance(weight, nn.Parameter) or tuple(weight.shape) != (num_experts, d_model):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        want = (num_experts, d_model)
        raise ValueError(f"{name}.weight is {shape}, expected [E, d] = {want}")
    top_k = getattr(router, "top_k", None)
    if not is_int(top_k):
        raise ValueError(f"{name} has no integer `top_k` (got {top_k!r})")
    return top_k


def _read_shared(
    block: nn.Module, d_model: int, activation: str, names: list[tuple[str, str]]
) -> tuple[int, bool]:
    """(shared hidden size or 0, has a shared gate); appends the shared tensors' names."""
    shared_name = _first_child(block, SHARED_NAMES)
    gate_name = _first_child(block, SHARED_GATE_NAMES)
    if shared_name is None:
        if gate_name is not None:
            raise ValueError(f"has a {gate_name} but no shared expert")
        return 0, False
    shared = getattr(block, shared_name)
    projs = {p: getattr(shared, p, None) for p in ("gate_proj", "up_proj", "down_proj")}
    if not all(isinstance(m, nn.Linear) and m.bias is None for m in projs.values()):
        raise ValueError(f"{shared_name} is not a gate_proj/up_proj/down_proj MLP without biases")
    shared_act = identify_activation(getattr(shared, "act_fn", None), f"{shared_name}.act_fn")
    if shared_act != activation:
        raise ValueError(f"{shared_name} uses {shared_act} but the experts use {activation}")
    names += [(f"{shared_name}.{p}.weight", f"shared.{p}.weight") for p in projs]
    if gate_name is not None:
        gate = getattr(block, gate_name)
        if not (isinstance(gate, nn.Linear) and gate.bias is None and gate.out_features == 1):
            raise ValueError(f"{gate_name} is not a Linear({d_model}, 1) without bias")
        names.append((f"{gate_name}.weight", "shared_gate.weight"))
    return projs["gate_proj"].out_features, gate_name is not None


def _router_attr(router: nn.Module, attrs: tuple[str, ...], default: object) -> object:
    for attr in attrs:
        value = getattr(router, attr, None)
        if value is not None:
            return value
    return default


# Numerical checks ---------------------------------------------------------------------


def check_block(block: nn.Module, spec: BlockSpec, generator: torch.Generator) -> None:
    """ValueError unless (1) adaptive_moe's router picks the same experts with the same
    weights as the block's router, in fp32, and (2) the block's output equals the
    per-expert reference of ``spec`` under the block's own routing (to the block's
    dtype's rounding)."""
    router = getattr(block, spec.router)
    x = torch.randn(_CHECK_TOKENS, spec.d_model, generator=generator)  # [T, d] fp32, CPU
    _verify_router(router, spec, x)
    _verify_output(block, router, spec, x.to(spec.device, spec.dtype))


@torch.no_grad()
def _verify_router(router: nn.Module, spec: BlockSpec, x: torch.Tensor) -> None:
    theirs = copy.deepcopy(router).float().cpu()
    try:
        _, their_w, their_ids = theirs(x)  # [T, E], [T, k], [T, k]
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"its router {type(router).__name__} cannot be called as router(x) -> "
            f"(logits, weights, ids): {err}"
        ) from err
    ours = Router(spec.d_model, spec.router_config())
    ours.weight.copy_(theirs.weight)
    if spec.score_correction_bias:
        ours.e_score_correction_bias.copy_(getattr(theirs, BIAS_NAME))
    routing = ours(x)
    their_ids, order = their_ids.sort(dim=-1)
    our_ids, our_order = routing.topk_ids.sort(dim=-1)
    same_ids = torch.equal(their_ids, our_ids)
    if not same_ids or not torch.allclose(
        their_w.float().gather(1, order), routing.gates.gather(1, our_order), rtol=1e-5, atol=1e-6
    ):
        raise ValueError(
            f"its router {type(router).__name__} does not route like the rule read from it "
            f"(score_func={spec.score_func}, renormalize={spec.renormalize}, "
            f"num_groups={spec.num_groups}, topk_groups={spec.topk_groups}, "
            f"routed_scaling_factor={spec.routed_scaling_factor}): "
            f"{'the weights' if same_ids else 'the chosen experts'} differ"
        )


@torch.no_grad()
def _verify_output(block: nn.Module, router: nn.Module, spec: BlockSpec, x: torch.Tensor) -> None:
    was_training = block.training
    block.eval()
    try:
        got = block(x.unsqueeze(0))  # [1, T, d]
    finally:
        block.train(was_training)
    if not isinstance(got, torch.Tensor) or got.shape != (1, *x.shape):
        raise ValueError(
            f"its forward returns {type(got).__name__}, not one tensor shaped like its input"
        )
    _, weights, ids = router(x)
    want = _reference_output(block, spec, x.float(), weights.float(), ids)  # [T, d]
    err = (got[0].float() - want).abs().max() / want.abs().max().clamp_min(1e-30)
    tol = max(1e-4, 8 * torch.finfo(spec.dtype).eps)
    if not err <= tol:
        raise ValueError(
            f"its output differs from the experts/shared-expert composition read from it "
            f"(relative error {float(err):.2e} > {tol:.0e})"
        )


def _reference_output(
    block: nn.Module, spec: BlockSpec, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """fp32 per-expert loop of what ``spec`` says ``block`` computes for tokens x [T, d]
    routed to ``ids`` [T, k] with combine ``weights`` [T, k]."""
    act = ACTIVATION_FNS[spec.activation]
    experts = block.experts
    out = torch.zeros_like(x)  # [T, d]
    for e in ids.unique().tolist():
        rows, slot = (ids == e).nonzero(as_tuple=True)
        gate, up = F.linear(x[rows], experts.gate_up_proj[e].float()).chunk(2, dim=-1)
        y = F.linear(act(gate) * up, experts.down_proj[e].float())  # [n_e, d]
        out.index_add_(0, rows, y * weights[rows, slot, None])
    if spec.shared_d_ff:
        w = {
            ours: block.get_parameter(theirs).float()
            for theirs, ours in spec.names
            if ours.startswith("shared")
        }
        hidden = act(F.linear(x, w["shared.gate_proj.weight"])) * F.linear(
            x, w["shared.up_proj.weight"]
        )  # [T, h_s]
        shared = F.linear(hidden, w["shared.down_proj.weight"])  # [T, d]
        if spec.shared_gate:
            shared = torch.sigmoid(F.linear(x, w["shared_gate.weight"])) * shared
        out = out + shared
    return out
