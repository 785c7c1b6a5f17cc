"""The expert layout as torch.distributed sees it: ``torch.distributed.checkpoint`` and
``load_state_dict`` across world sizes (W = 1, 2, 4; E >= W and E < W; ``load_state_dict``
between 1 and 4 with E < W only). Not here: DCP 4 -> 8 ranks (restores exactly, checked
once by hand; 8 spawned ranks take ~70 s on a 2-core machine).

Reference: the full ``[E, ...]`` tensors the saving ranks loaded (drawn from a seed, in
the transformers layout). Each loading rank's parameters are NaN-poisoned first and then
compared exactly with the box of the reference that ``ShardLayout``'s rule (written out
again here, not taken from the library) gives that rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from adaptive_moe.runtime.layer import MoELayer
from tests.dist_utils import run_distributed

pytestmark = [
    pytest.mark.filterwarnings("ignore:MoELayer has no strategy table"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch.distributed"),
]

D, H = 4, 8  # d_model divisible by every s used (bias is split along d)


def _full(e: int, glu: bool, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = 2 * H if glu else H
    w1 = "gate_up_proj" if glu else "up_proj"
    return {
        w1: torch.randn(e, rows, D, generator=g),
        w1 + "_bias": torch.randn(e, rows, generator=g),
        "down_proj": torch.randn(e, D, H, generator=g),
        "down_proj_bias": torch.randn(e, D, generator=g),
    }


def _expected_local(name: str, full: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s shard by the layout rule: E >= W whole experts in rank order;
    E < W expert rank // s, hidden rows [j*h/s, (j+1)*h/s) of gate and of up, the same
    columns of down_proj, and the j-th d/s columns of down_proj_bias."""
    e = full.shape[0]
    if e >= world:
        n = e // world
        return full[rank * n : (rank + 1) * n]
    s = world // e
    ex, j = rank // s, rank % s
    c = H // s
    part = full[ex : ex + 1]
    if name in ("gate_up_proj", "gate_up_proj_bias"):
        return torch.cat([part[:, j * c : (j + 1) * c], part[:, H + j * c : H + (j + 1) * c]], 1)
    if name in ("up_proj", "up_proj_bias"):
        return part[:, j * c : (j + 1) * c]
    if name == "down_proj":
        return part[:, :, j * c : (j + 1) * c]
    n = D // s  # down_proj_bias
    return part[:, j * n : (j + 1) * n]


def _layer(e: int, glu: bool) -> MoELayer:
    return MoELayer(D, H, e, top_k=1, glu=glu, bias=True)


def _check_local(layer: MoELayer, full: dict, world: int, rank: int) -> list[str]:
    bad = []
    for name, ref in full.items():
        got = getattr(layer.experts, name).detach()
        if not torch.equal(got, _expected_local(name, ref, world, rank)):
            bad.append(name)
    return bad


def _router(e: int) -> torch.Tensor:
    return torch.arange(e * D, dtype=torch.float32).view(e, D)


def _save(path: str, e: int, glu: bool) -> None:
    layer = _layer(e, glu)
    layer.load_expert_weights(**_full(e, glu, seed=1))
    with torch.no_grad():
        layer.router.weight.copy_(_router(e))
    dcp.save(layer.state_dict(), checkpoint_id=path)


def _load(path: str, e: int, glu: bool, world: int, rank: int) -> list[str]:
    layer = _layer(e, glu)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(float("nan"))
    sd = layer.state_dict()
    dcp.load(sd, checkpoint_id=path)
    layer.load_state_dict(sd)
    bad = _check_local(layer, _full(e, glu, seed=1), world, rank)
    if not torch.equal(layer.router.weight.detach(), _router(e)):
        bad.append("router.weight")
    return bad


# (E, saving W, glu): E >= W and E < W on 2 and 4 ranks; each is loaded on W' = 1, 2, 4.
SAVED_ON_2 = [(4, True), (1, True)]
SAVED_ON_4 = [(4, True), (2, True), (2, False)]


def _phase(
    rank: int, world: int, root: str, save: list, load: list, round_trip: tuple | None
) -> tuple[dict, dict | None]:
    """Save the ``save`` cases on this world, then load every ``load`` case; with
    ``round_trip`` = (one-process state dict, E), also ``_state_dict_round_trip`` (the
    4-rank load_state_dict case rides on this spawn instead of paying for its own)."""
    for e, glu in save:
        _save(f"{root}/w{world}_e{e}_{glu}", e, glu)
    loads = {
        (w, e, glu): _load(f"{root}/w{w}_e{e}_{glu}", e, glu, world, rank) for w, e, glu in load
    }
    return loads, None if round_trip is None else _state_dict_round_trip(rank, world, *round_trip)


def _loadable(e: int, world: int) -> bool:
    return e % world == 0 or world % e == 0


def _state_dict_round_trip(rank: int, world: int, one_rank_sd: dict, e: int) -> dict:
    """1 process -> W ranks by load_state_dict of full tensors, and W ranks -> 1 process
    through full_tensor(); a shard-shaped plain tensor is refused with the way out."""
    full = _full(e, True, seed=2)
    layer = _layer(e, True)
    layer.load_state_dict(one_rank_sd)
    into_w = _check_local(layer, full, world, rank)
    gathered = {
        k: v.full_tensor() if hasattr(v, "full_tensor") else v
        for k, v in layer.state_dict().items()
    }
    shard_sd = dict(gathered)
    shard_sd["experts.gate_up_proj"] = layer.experts.gate_up_proj.detach().clone()
    try:
        _layer(e, True).load_state_dict(shard_sd)
        refused = ""
    except ValueError as err:
        refused = str(err)
    return {"into_w": into_w, "gathered": gathered, "refused": refused}


def _one_process_state_dict(e: int) -> dict:
    single = MoELayer(D, H, e, top_k=1, bias=True)  # this process, no process group
    single.load_expert_weights(**_full(e, True, seed=2))
    sd = single.state_dict()
    assert sd["experts.gate_up_proj"].shape == (e, 2, H, D)
    return sd


def _check_round_trip(res: list[dict], e: int) -> None:
    for r in res:
        assert r["into_w"] == []
        assert "torch.distributed.checkpoint" in r["refused"], r["refused"]
        for k, v in r["gathered"].items():  # every rank gathers the same full tensors
            assert torch.equal(v, res[0]["gathered"][k]), k
    back = MoELayer(D, H, e, top_k=1, bias=True)
    with torch.no_grad():
        for p in back.experts.parameters():
            p.fill_(float("nan"))
    back.load_state_dict(res[0]["gathered"])
    assert _check_local(back, _full(e, True, seed=2), 1, 0) == []


E_ROUND_TRIP_ON_4 = 2  # E < W: two ranks share each expert


@pytest.fixture(scope="module")
def dcp_phases(tmp_path_factory) -> tuple[str, dict, list[dict]]:
    """Saves on 2 then 4 spawned ranks, loads on 2, 4 (and 2 again for the 4-rank
    checkpoints); returns the root, every (case, W', rank) -> wrong tensor names, and
    the 4-rank phase's load_state_dict round trips."""
    root = str(tmp_path_factory.mktemp("dcp"))
    on2 = [(2, e, g) for e, g in SAVED_ON_2]
    on4 = [(4, e, g) for e, g in SAVED_ON_4]
    results, round_trips = {}, []
    for world, save, load, trip in (
        (2, SAVED_ON_2, on2, None),
        (4, SAVED_ON_4, on2 + on4, (_one_process_state_dict(E_ROUND_TRIP_ON_4), E_ROUND_TRIP_ON_4)),
        (2, [], on4, None),
    ):
        load = [c for c in load if _loadable(c[1], world)]
        out = run_distributed(_phase, world, (root, save, load, trip), timeout=120)
        for rank, (res, rt) in enumerate(out):
            for case, bad in res.items():
                results[(case, world, rank)] = bad
            if rt is not None:
                round_trips.append(rt)
    return root, results, round_trips


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_dcp_save_on_w_ranks_loads_exactly_on_1_2_and_4(dcp_phases):
    root, results, _ = dcp_phases
    results = dict(results)
    # W' = 1: this process, no process group (DCP reads every shard itself)
    for w, e, glu in [(2, e, g) for e, g in SAVED_ON_2] + [(4, e, g) for e, g in SAVED_ON_4]:
        results[((w, e, glu), 1, 0)] = _load(f"{root}/w{w}_e{e}_{glu}", e, glu, 1, 0)
    loaded_on = {(case, world) for case, world, _ in results}
    assert len(loaded_on) == 15  # each of the 5 saved cases on 1, 2 and 4 ranks
    assert {k: v for k, v in results.items() if v} == {}


@pytest.mark.dist
@pytest.mark.timeout(120)
@pytest.mark.parametrize("e", [4, 1])  # E >= W, E < W (s = 2)
def test_load_state_dict_between_one_process_and_two_ranks(e):
    one_rank_sd = _one_process_state_dict(e)
    _check_round_trip(run_distributed(_state_dict_round_trip, 2, (one_rank_sd, e), timeout=90), e)


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_load_state_dict_between_one_process_and_four_ranks(dcp_phases):
    _, _, round_trips = dcp_phases  # run inside the 4-rank DCP phase, E = 2 < W
    assert len(round_trips) == 4
    _check_round_trip(round_trips, E_ROUND_TRIP_ON_4)


def _wrapped_save(rank: int, world: int, path: str) -> None:
    from adaptive_moe import wrap
    from tests.test_wrap import build_model

    model = wrap(build_model("mixtral"))
    dcp.save(model.state_dict(), checkpoint_id=path)


def _wrapped_load(rank: int, world: int, path: str) -> list[str]:
    from adaptive_moe import wrap
    from adaptive_moe.integrations.transformers import export_state_dict
    from tests.test_wrap import build_model

    want = build_model("mixtral").state_dict()
    model = wrap(build_model("mixtral", seed=5))  # other weights, overwritten by the load
    sd = model.state_dict()
    dcp.load(sd, checkpoint_id=path)
    model.load_state_dict(sd)
    got = export_state_dict(model)  # full tensors, gathered by the library's own path
    return [k for k, v in want.items() if not torch.equal(got[k], v)]


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_dcp_of_a_wrapped_transformers_model_reshards_and_loads_into_plain_transformers(
    tmp_path,
):
    pytest.importorskip("transformers")
    from tests.test_wrap import build_model

    path = str(tmp_path / "ckpt")
    run_distributed(_wrapped_save, 2, (path,), timeout=120)  # Mixtral E = 4 on 2 ranks
    assert run_distributed(_wrapped_load, 4, (path,), timeout=150) == [[]] * 4
    assert _wrapped_load(0, 1, path) == []  # one process, no process group
    plain = build_model("mixtral", seed=5)  # never wrapped: its own names and layout
    sd = plain.state_dict()
    dcp.load(sd, checkpoint_id=path)
    want = build_model("mixtral").state_dict()
    assert [k for k, v in want.items() if not torch.equal(sd[k], v)] == []


def _mixtral(e: int, seed: int = 0):
    from tests.test_wrap import build_model

    return build_model("mixtral", seed=seed, num_local_experts=e, num_experts_per_tok=min(e, 2))


def _wrapped_case(path: str, e: int) -> list[str]:
    """Load checkpoint ``path`` (Mixtral with E experts) into a wrapped model with other
    weights; the keys whose gathered full tensors differ from the saved model's. E = 1
    goes through torch.distributed.checkpoint.state_dict's get/set_model_state_dict,
    E = 2 through the module's own state_dict / load_state_dict."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from adaptive_moe import wrap
    from adaptive_moe.integrations.transformers import export_state_dict

    want = _mixtral(e).state_dict()
    model = wrap(_mixtral(e, seed=5))
    sd = get_model_state_dict(model) if e == 1 else model.state_dict()
    dcp.load(sd, checkpoint_id=path)
    if e == 1:
        set_model_state_dict(model, sd)
    else:
        model.load_state_dict(sd)
    got = export_state_dict(model)
    return [k for k, v in want.items() if not torch.equal(got[k], v)]


def _wrapped_phase(rank: int, world: int, root: str, save: list, load: list) -> dict:
    from adaptive_moe import wrap

    for e in save:
        dcp.save(wrap(_mixtral(e)).state_dict(), checkpoint_id=f"{root}/w{world}_e{e}")
    return {(w, e): _wrapped_case(f"{root}/w{w}_e{e}", e) for w, e in load}


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_dcp_of_wrapped_models_reshards_between_e_below_w_and_e_at_least_w(tmp_path):
    """Mixtral E = 1 saved on 2 ranks (E < W) loads on 1, 2 and 4; E = 2 saved on 4 ranks
    (E < W) loads on 1, 2 (E >= W) and 4; E = 2 saved on 2 ranks (E >= W) loads on 4
    (E < W) -- and the E < W checkpoints load into plain transformers models."""
    pytest.importorskip("transformers")
    root = str(tmp_path)
    results = {}
    for world, save, load in (
        (2, [1, 2], []),
        (4, [2], [(2, 1), (2, 2), (4, 2)]),
        (2, [], [(2, 1), (4, 2)]),
    ):
        for rank, res in enumerate(run_distributed(_wrapped_phase, world, (root, save, load))):
            results.update({(case, world, rank): bad for case, bad in res.items()})
    for case in ((2, 1), (2, 2), (4, 2)):
        results[(case, 1, 0)] = _wrapped_case(f"{root}/w{case[0]}_e{case[1]}", case[1])
    assert len({(case, world) for case, world, _ in results}) == 8
    assert {k: v for k, v in results.items() if v} == {}
    for w, e in ((2, 1), (4, 2)):  # never wrapped: its own names and layout
        plain = _mixtral(e, seed=5)
        sd = plain.state_dict()
        dcp.load(sd, checkpoint_id=f"{root}/w{w}_e{e}")
        want = _mixtral(e).state_dict()
        assert [k for k, v in want.items() if not torch.equal(sd[k], v)] == [], (w, e)
