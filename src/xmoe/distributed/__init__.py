"""xmoe.distributed: expert parallelism and data parallelism on torch.distributed.

    torchrun --nproc-per-node 2 -m xmoe train --preset cpu-xmoe-64x128 --out runs/ep --ep-size 2
    xmoe train --nproc 2 --ep-size 2 ...                      (the same, launched for you)

Depends on xmoe.moe and torch only. See docs/distributed.md for the layout and its costs.
"""

from .experts import AllToAllDispatcher, all_to_all, local_shard, shard_experts
from .parallel import (
    DP_IMPLS,
    DataParallelConfig,
    Layout,
    Parallel,
    Ranks,
    RanksLost,
    SingleProcess,
    init_from_env,
    lost_contact,
    reshard,
    transformer_blocks,
)

__all__ = ["AllToAllDispatcher", "DP_IMPLS", "DataParallelConfig", "local_shard", "Layout", "Parallel", "Ranks", "RanksLost",
           "SingleProcess", "all_to_all", "init_from_env", "lost_contact", "reshard",
           "shard_experts", "transformer_blocks"]
