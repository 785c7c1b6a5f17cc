"""``GraphCache``: the inference forwards a layer captures as CUDA graphs
(``InferenceConfig.cuda_graph_tokens``)."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

# ---------------------------------------------------------------- CUDA-graph cache

# Graphs one layer keeps at most (least recently used dropped first): each holds its
# own memory pool (intermediates of one forward at its T).
MAX_GRAPHS = 16


@dataclasses.dataclass
class _Captured:
    """One captured forward: its static input and output, and what the forward returned
    besides (host objects and graph buffers, refreshed by every replay)."""

    graph: torch.cuda.CUDAGraph
    x: Tensor  # [T, d] static input, allocated outside the graph's pool
    y: Tensor  # [T, d] static output
    state: object


class GraphCache:
    """The layer's captured inference forwards (``InferenceConfig.cuda_graph_tokens``).

    ``run(key, x, forward, weights)``: the first call with a key runs ``forward(x)``
    eagerly (it compiles and autotunes the kernels, which a capture cannot), the second
    captures ``forward`` on a static copy of x and replays it, later calls copy x into
    the static input and replay. ``forward`` returns (y, state): ``run`` returns a copy
    of y and the state of the captured call. Each graph has a private memory pool, so
    a replay never overwrites another graph's buffers. ``weights``: the data pointers of
    every weight; when they change (a move, a reassigned parameter) every graph is
    dropped. Copies (``copy.deepcopy``, pickling) start empty: a graph belongs to its
    buffers."""

    def __init__(self, max_graphs: int = MAX_GRAPHS) -> None:
        self.max_graphs = max_graphs
        self._graphs: collections.OrderedDict[tuple, _Captured] = collections.OrderedDict()
        self._seen: set[tuple] = set()
        self._weights: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()
        self._seen.clear()

    def __deepcopy__(self, memo: dict[int, object]) -> GraphCache:
        return GraphCache(self.max_graphs)

    def __getstate__(self) -> dict[str, object]:
        return {"max_graphs": self.max_graphs}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["max_graphs"])

    def run(
        self,
        key: tuple,
        x: Tensor,
        forward: Callable[[Tensor], tuple[Tensor, object]],
        weights: tuple[int, ...],
    ) -> tuple[Tensor, object]:
        """(y [T, d], state) of ``forward(x [T, d])``, see the class docstring."""
        if weights != self._weights:
            self.clear()
            self._weights = weights
        captured = self._graphs.get(key)
        if captured is None:
            if key not in self._seen:
                self._seen.add(key)
                return forward(x)
            static_x = x.clone()  # [T, d], outside the graph's pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y, state = forward(static_x)
            captured = self._graphs[key] = _Captured(graph, static_x, static_y, state)
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            captured.x.copy_(x)
        captured.graph.replay()  # also right after the capture, which ran nothing
        return captured.y.clone(), captured.state
