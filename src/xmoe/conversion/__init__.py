"""xmoe.conversion: dense models made sparse (MoEfication, Zhang et al. 2022, with XMoE's
threshold router, Yang et al. 2024).

Each dense FFN's neurons are split into E equal groups (contiguous, or clustered by co-activation),
each group becoming an expert; a router is fitted on calibration text to predict which groups
carry a token's FFN output; unit combine weights keep the converted model exact at t >= 1.

    from xmoe.conversion import ConversionConfig, convert_checkpoint, convert_gpt
    convert_checkpoint("runs/dense", "runs/dense-x8", ConversionConfig(num_experts=8, partition="clustered"))
    # Hugging Face (pip install 'xmoe[hf]'): xmoe.conversion.hf.convert_hf(model, calibration_ids, cfg)
    # the compute dial of a converted model: xmoe.sweep (measure_layers, sweep)
"""

from .ffn import DenseFFN, expert_config, group_contributions, split_into
from .gpt import calibration_batch, convert_checkpoint, convert_gpt, dense_ffn
from .layer import ConversionConfig, LayerReport, convert_ffn
from .partition import PARTITIONS, check_partition, clustered_partition, contiguous_partition
from .router_fit import RouterFit, RouterFitConfig, fit_router, router_targets

__all__ = [
    "PARTITIONS", "ConversionConfig", "DenseFFN", "LayerReport", "RouterFit", "RouterFitConfig",
    "calibration_batch", "check_partition", "clustered_partition", "contiguous_partition", "convert_checkpoint",
    "convert_ffn", "convert_gpt", "dense_ffn", "expert_config", "fit_router", "group_contributions",
    "router_targets", "split_into",
]
