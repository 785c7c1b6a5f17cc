"""Communication: the process-group mesh, the token exchange (linear and 2DH all-to-all,
blocking or overlapped) and the parameter all-gather whose backward is a reduce-scatter.
NCCL on GPUs, gloo on CPUs, the same code."""

from adaptive_moe.comm.alltoall import (
    ExchangePlan,
    PendingExchange,
    PreparedExchange,
    exchange,
    exchange_start,
    plan_exchange,
    prepare_exchange,
)
from adaptive_moe.comm.gather import all_gather_counts, all_gather_rows, reduce_scatter_rows
from adaptive_moe.comm.mesh import Mesh, build_mesh, default_group, divisors

__all__ = [
    "ExchangePlan",
    "Mesh",
    "PendingExchange",
    "PreparedExchange",
    "all_gather_counts",
    "all_gather_rows",
    "build_mesh",
    "default_group",
    "divisors",
    "exchange",
    "exchange_start",
    "plan_exchange",
    "prepare_exchange",
    "reduce_scatter_rows",
]
