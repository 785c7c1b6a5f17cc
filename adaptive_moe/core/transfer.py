"""Host-side integer metadata of one forward, copied to the device in one transfer.

A forward's plan produces many small index arrays (split sizes, row orders, grouping
offsets). Copying each separately costs one pageable host-to-device copy (and, on GPU,
one synchronising staging copy) apiece; ``HostBatch`` concatenates them into one pinned
host tensor, issues one ``non_blocking`` copy and hands out views into the device copy:

    batch = HostBatch()
    i = batch.add(order)            # any 1-D integer sequence, stored as int64
    views = batch.upload(device)    # views[i]: [len(order)] int64 on ``device``

On CPU nothing is copied: the views are into the host tensor itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class HostBatch:
    """Integer arrays collected on the host for one ``upload`` (see module docstring)."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []

    def add(self, values: Sequence[int] | np.ndarray) -> int:
        """Queue ``values`` (1-D, integers) and return the index of its view."""
        part = np.asarray(values, dtype=np.int64).reshape(-1)
        self._parts.append(part)
        return len(self._parts) - 1

    def upload(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Every queued array as an int64 view on ``device``, in ``add`` order."""
        if not self._parts:
            return ()
        lengths = [p.size for p in self._parts]
        host = torch.from_numpy(np.concatenate(self._parts))  # [sum(lengths)]
        if device.type != "cpu":
            # Pinned memory lets the copy run asynchronously; torch's caching host
            # allocator keeps the buffer alive until the copy has finished.
            host = host.pin_memory().to(device, non_blocking=True)
        return host.split(lengths)
