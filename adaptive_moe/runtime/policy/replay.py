"""What recent forwards decided, replayed when activation checkpointing recomputes them.

A recomputation must take the path and run the strategy its forward took (checkpointing
checks that it saves the same tensors), and it is not a new forward for the statistics
or the online tuner. One memory serves every decision a forward makes, each under a key
built from what the recomputation sees again: the token count for the path choice (made
before routing), the exchanged counts for the strategy (checkpointing restores the RNG
state, so the routing, hence the counts, repeat).
"""

from __future__ import annotations

import collections

import torch

# Decisions remembered for recomputation: a forward records up to two (its path and its
# strategy), so this covers 64 forwards, more than the micro-batches of one step.
REPLAY_MEMORY = 128


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()  # ``take``'s answer for a key with nothing recorded


class ReplayMemory:
    """Decisions of the last ``size`` forwards, ``(kind, key) -> value``.

    ``take`` returns and forgets the latest value recorded under a key, so forwards with
    equal keys are replayed last first, as backward recomputes them. Copies start empty:
    a copy's backward never recomputes the original's forwards."""

    def __init__(self, size: int = REPLAY_MEMORY) -> None:
        self.size = size
        self._entries: collections.deque[tuple[tuple[str, object], object]] = collections.deque(
            maxlen=size
        )

    def record(self, kind: str, key: object, value: object) -> None:
        self._entries.append(((kind, key), value))

    def take(self, kind: str, key: object) -> object:
        """The latest value recorded under (kind, key), removed; ``MISSING`` if none."""
        wanted = (kind, key)
        for i in range(len(self._entries) - 1, -1, -1):
            if self._entries[i][0] == wanted:
                value = self._entries[i][1]
                del self._entries[i]
                return value
        return MISSING

    def recorded(self, kind: str) -> list[object]:
        """The values of ``kind`` still held, oldest first (for inspection and tests)."""
        return [value for (k, _), value in self._entries if k == kind]

    def __deepcopy__(self, memo: dict[int, object]) -> ReplayMemory:
        return ReplayMemory(self.size)


@torch.compiler.disable
def in_backward() -> bool:
    """True while autograd runs a backward pass on this thread, i.e. while activation
    checkpointing recomputes a forward (torch has no public query; checkpointing itself
    reads the same one)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1
