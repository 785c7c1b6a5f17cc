"""The cost model with the default published figures (A100 / H100 links and rooflines)
reproduces Tutel's scaling trends qualitatively (arXiv 2206.03382; digest in
shared/reference/tutel-paper.md):

  * 2DH all-to-all overtakes the linear one only at large scale for large messages
    (Fig. 18 at 32/256 MiB; the maintainers' "about 256 GPUs"), and from small scale
    for small messages (Fig. 18 at 1 MiB);
  * r = 0 (DP) wins at high capacity with small experts, r = 1 as capacity falls or the
    experts grow, r > 1 at low capacity on many GPUs (Fig. 12).

The layer of the 2DH check is Tutel's Fig. 14 setup: d = h = 2048, two experts per GPU,
k = 2, 16384 tokens per GPU (128 MiB sent per rank and direction).
"""

from __future__ import annotations

import pytest

from adaptive_moe.core.strategy import Strategy
from adaptive_moe.planning.cost_model import Cluster, LayerSpec, strategy_cost, workload_counts
from adaptive_moe.planning.kernel_profile import roofline
from adaptive_moe.planning.links import PRESETS
from adaptive_moe.planning.planner import candidate_strategies, predict_bucket

FIGURES = [("a100-ndv4", "a100"), ("h100-ndr", "h100")]


def _a2a_ms(preset: str, device: str, world: int, tokens: int, algo: str) -> float:
    layer = LayerSpec(2048, 2048, 2 * world, 2)  # E_g = 2
    cluster = Cluster(world, 8, PRESETS[preset])
    counts = workload_counts(world, 2 * world, 2, tokens, tokens)  # balanced: T*W*k/E = T
    cost = strategy_cost(
        layer, cluster, roofline(device, 2048), Strategy(1, algo, 1, "scatter"), counts
    )
    return cost.a2a_ms


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("preset", "device"), FIGURES)
def test_2dh_overtakes_linear_only_at_large_scale_for_large_messages(preset, device):
    lin = {w: _a2a_ms(preset, device, w, 16384, "linear") for w in (16, 128, 512, 2048)}
    two = {w: _a2a_ms(preset, device, w, 16384, "2dh") for w in (16, 128, 512, 2048)}
    assert lin[16] < two[16] and lin[128] < two[128]  # extra intra pass + copies cost more
    assert two[512] < lin[512] and two[2048] < lin[2048]  # W messages of S/W cost more
    assert lin[2048] / two[2048] > lin[512] / two[512]  # and the gap keeps growing


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("preset", "device"), FIGURES)
def test_2dh_wins_from_small_scale_for_small_messages(preset, device):
    # 1024 tokens: 8 MiB per rank, 64 KiB per peer at W = 128
    assert _a2a_ms(preset, device, 64, 1024, "2dh") < _a2a_ms(preset, device, 64, 1024, "linear")


def _best_r(world: int, experts: int, d: int, h: int, tokens: int) -> int:
    layer = LayerSpec(d, h, experts, 2)
    cluster = Cluster(world, 8, PRESETS["a100-ndv4"])
    counts = workload_counts(world, experts, 2, tokens, -(-world * tokens * 2 // experts))
    strategies = candidate_strategies(layer, cluster, ["scatter"])
    costs = predict_bucket(layer, cluster, roofline("a100", d), strategies, counts)
    return min(costs, key=lambda s: costs[s].total_ms).r


@pytest.mark.timeout(60)
def test_r0_wins_at_high_capacity_with_small_experts():
    # one node of 8, 16 experts: small experts (d 1024, h 256)
    assert _best_r(8, 16, 1024, 256, 8192) == 0  # many tokens per expert: move weights
    assert _best_r(8, 16, 1024, 256, 128) == 1  # few: move tokens
    assert _best_r(8, 16, 2048, 2048, 8192) == 1  # larger experts: move tokens
    # across nodes the weight gather runs over InfiniBand: EP
    assert _best_r(64, 64, 1024, 256, 8192) == 1


@pytest.mark.timeout(60)
def test_r_above_1_at_low_capacity_on_many_gpus():
    # 256 GPUs, 64 experts (s = 4), large experts. With few tokens, repeating them to r
    # hidden blocks costs less than all-gathering the h/r block from s/r ranks; with
    # many, the repeated tokens cost more than the gather
    assert _best_r(256, 64, 2048, 8192, 128) > 1
    assert _best_r(256, 64, 2048, 8192, 8192) == 1
