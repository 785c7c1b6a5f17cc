"""``torch.distributed.checkpoint`` of a model holding ``MoELayer``s, resharded.

    python examples/ecosystem_dcp.py        # save on 2 spawned gloo ranks, load on 4 and on 1

``model.state_dict()`` presents every expert shard as a DTensor of the full tensor
(``gate_up_proj`` as [E, 2, h, d]: the gate/up axis explicit so that a hidden slice is
one box), so ``dcp.save`` / ``dcp.load`` reshard to any world size with nothing special:
E = 2 experts are whole on 2 ranks and hidden-split on 4. Exits 1 if a weight differs.
"""

from __future__ import annotations

import sys
import tempfile
import warnings

import torch
import torch.distributed.checkpoint as dcp

import adaptive_moe as am
from adaptive_moe.core.launch import launch

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


def load(rank: int, world: int, path: str) -> bool:
    warnings.filterwarnings("ignore", message="MoELayer has no strategy table")
    layer = am.MoELayer(D, H, E, top_k=1)
    state = layer.state_dict()
    dcp.load(state, checkpoint_id=path)  # writes straight into the parameters
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


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        launch(save, 2, (tmp,))
        ok = all(launch(load, 4, (tmp,)))
        ok = ok and load(0, 1, tmp)  # this process, no process group
    print("resharded 2 -> 4 and 2 -> 1 exactly" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
