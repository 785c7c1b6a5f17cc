"""Whether a size fits the machine, checked before anything is allocated, so that an
absurd flag ends in a message instead of an allocator's traceback (or hours of paging):

    check_fits(need_bytes, "cpu", "--d-model 1000000 --layers 4", ranks=2)

The memory of a device is its total (a CUDA device's, or this host's physical RAM for
CPU ranks): what is in use by others changes while a run starts, so only what cannot fit
even on an empty machine is refused.
"""

from __future__ import annotations

import os

import torch

GIB = 1 << 30
# What a CPU rank's interpreter holds before any tensor: torch imported (the trainer's
# ranks measured ~375 MiB resident); counted per rank that shares the host.
PROCESS_BYTES = 256 << 20


def host_memory() -> int | None:
    """This host's physical RAM in bytes (None where the OS does not tell)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
        return None


def device_memory(device: torch.device | str | None) -> int | None:
    """Total bytes of ``device`` (None: the default device): a CUDA device's memory, the
    host's RAM for CPU; None where unknown (``meta``, no CUDA, another backend)."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "cpu":
        return host_memory()
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory
    return None


def fmt_bytes(n: float) -> str:
    """``1.5 GiB``; huge figures in exponent form (``3.7e+12 GiB``)."""
    gib = n / GIB
    return f"{gib:.3g} GiB" if gib < 1e6 else f"{gib:.2e} GiB"


def check_fits(need: float, device: torch.device | str | None, what: str, ranks: int = 1) -> None:
    """Raise ValueError when ``ranks`` x ``need`` bytes exceed ``device``'s memory (the
    ranks share it: spawned CPU ranks share the host). ``what`` names the settings (the
    flags) that ask for it; nothing is checked where the memory is unknown."""
    have = device_memory(device)
    if have is None:
        return
    total = need * ranks
    if total > have:
        name = torch.device(device) if device is not None else torch.get_default_device()
        where = "this host's RAM" if name.type == "cpu" else f"the memory of {name}"
        each = f" ({ranks} ranks x {fmt_bytes(need)})" if ranks > 1 else ""
        raise ValueError(
            f"{what}: needs about {fmt_bytes(total)}{each}, but {where} is "
            f"{fmt_bytes(have)}; choose smaller sizes (or fewer ranks)"
        )
