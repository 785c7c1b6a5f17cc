"""``torch.distributed.checkpoint`` of a model holding ``MoELayer``s, resharded.

    python examples/ecosystem_dcp.py          # save on 2 spawned gloo ranks, load on 4 and on 1
    torchrun --nproc-per-node 4 examples/ecosystem_dcp.py   # save on the 4, load on 4, 2 and 1

``model.state_dict()`` presents every expert shard as a DTensor of the full tensor
(``gate_up_proj`` as [E, 2, h, d]: the gate/up axis explicit so that a hidden slice is
one box), so ``dcp.save`` / ``dcp.load`` reshard to any world size with nothing special:
E = 2 experts are whole on 2 ranks and hidden-split on 4. Under a launcher the W ranks
it started save, then load the checkpoint on the whole world and on every smaller
world size W' dividing W (the ranks split into W / W' expert groups of W', each loading
the whole checkpoint). ``--dir`` names the checkpoint directory (it must be one
directory every rank sees: a shared file system on several nodes); by default rank 0
creates a temporary one on this host and removes it at the end. Exits 1 if a weight
differs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import adaptive_moe as am
from adaptive_moe.comm.mesh import divisors
from adaptive_moe.core.launch import external_world_size, launch

D, H, E = 8, 16, 2


def full_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "gate_up_proj": torch.randn(E, 2 * H, D, generator=g),
        "down_proj": torch.randn(E, D, H, generator=g),
    }


def save(rank: int, world: int, path: str) -> None:
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    layer = am.MoELayer(D, H, E, top_k=1)
    layer.load_expert_weights(**full_weights())
    dcp.save(layer.state_dict(), checkpoint_id=path)


def load(rank: int, world: int, path: str, group: dist.ProcessGroup | None = None) -> bool:
    """Load ``path`` into a fresh layer on ``group`` (default: the world, or this process
    alone when there is no process group) and compare with the saved weights."""
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    # dcp.load's note that it loads in one process when no process group exists: intended
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    layer = am.MoELayer(D, H, E, top_k=1, process_group=group)
    state = layer.state_dict()
    # writes straight into the parameters; the group only coordinates the load plan
    dcp.load(state, checkpoint_id=path, process_group=group)
    layer.load_state_dict(state)
    # gathering the DTensors gives the full tensors back, in the [E, 2, h, d] view
    full = {
        k: v.full_tensor() if hasattr(v, "full_tensor") else v
        for k, v in layer.state_dict().items()
    }
    want = full_weights()
    return torch.equal(
        full["experts.gate_up_proj"].reshape(E, 2 * H, D), want["gate_up_proj"]
    ) and torch.equal(full["experts.down_proj"], want["down_proj"])


def on_launched_ranks(rank: int, world: int, path: str | None) -> list[tuple[int, bool]]:
    """Save on the launcher's W ranks, load on W and on each smaller divisor of W."""
    created = path is None
    # one directory for all ranks: rank 0's, by name (it is a path, not data, that travels)
    box = [tempfile.mkdtemp(prefix="ecosystem_dcp_") if created and rank == 0 else path]
    dist.broadcast_object_list(box, src=0)
    try:
        save(rank, world, box[0])
        results = []
        for size in reversed(divisors(world)):
            # new_subgroups is collective: every rank builds every group, joins its own
            group = None if size == world else dist.new_subgroups(size)[0]
            ok = torch.tensor(int(load(rank, world, box[0], group)))
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank's verdict
            results.append((size, bool(ok)))
        return results
    finally:
        dist.barrier()  # nobody reads the directory any more
        if created and rank == 0:
            shutil.rmtree(box[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="checkpoint directory (default: a temporary one)")
    args = parser.parse_args()
    world = external_world_size()
    if world is not None:
        results = launch(on_launched_ranks, world, (args.dir,))[0]
        ok = all(good for _, good in results)
        if int(os.environ.get("RANK", "0")) == 0:
            loads = ", ".join(f"{world} -> {size}" for size, _ in results)
            print(f"saved on {world} ranks, loaded {loads} " + ("exactly" if ok else "MISMATCH"))
        return 0 if ok else 1
    with tempfile.TemporaryDirectory() as tmp:
        path = args.dir or tmp
        launch(save, 2, (path,))
        ok = all(launch(load, 4, (path,)))
        ok = ok and load(0, 1, path)  # this process, no process group
    print("resharded 2 -> 4 and 2 -> 1 exactly" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
