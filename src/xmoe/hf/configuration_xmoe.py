"""The configs of xmoe's transformers models: the portable configs (xmoe.hf.standalone, the ones
exported folders carry), checked against xmoe's own model configs when built.

``XMoEConfig`` is an xmoe GPT (xmoe.models.gpt.GPTConfig as a ``PretrainedConfig``): GPTConfig's
fields, the MoE layer's fields as a plain dict (``moe``, None for a dense model), and the dial
``moe_threshold`` (the XMoE compute dial, Yang et al. 2024, arXiv 2403.18926, Sec. 3; None for a
compute-budgeted model: each layer's trained t). ``router_aux_loss_coef`` (0.01, the paper's
coefficient) weighs the balancing loss of a loss computed from ``labels``;
``router_entropy_loss_coef`` (0, off) adds the mean router entropy (`xmoe train`'s
train.entropy_loss_coef). ``XMoEConvertedConfig`` is a Hugging Face model converted by
``xmoe convert``.
"""

from __future__ import annotations

import dataclasses

import xmoe
from xmoe.models.gpt import GPTConfig
from xmoe.moe import MoEConfig

from .standalone import configuration_xmoe as portable


class XMoEConfig(portable.XMoEConfig):
    """The portable XMoEConfig, every field checked by GPTConfig and MoEConfig (their messages)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.to_gpt_config()

    def to_gpt_config(self) -> GPTConfig:
        """The GPTConfig this config describes (its fields are GPTConfig's), its MoE layers built
        with ``moe_threshold``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(GPTConfig) if f.name != "moe"}
        return GPTConfig(**fields, moe=moe_config(self))

    @classmethod
    def from_gpt_config(cls, cfg: GPTConfig, **kwargs) -> XMoEConfig:
        """The config of an xmoe GPT built from ``cfg`` (``kwargs``: e.g. bos/eos token ids); its
        MoEConfig becomes a plain dict."""
        return cls(**dataclasses.asdict(cfg), xmoe_version=xmoe.__version__, **kwargs)


class XMoEConvertedConfig(portable.XMoEConvertedConfig):
    """The portable XMoEConvertedConfig, its MoE fields checked by MoEConfig."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("xmoe_version", xmoe.__version__)
        super().__init__(**kwargs)
        moe_config(self)


def moe_config(config) -> MoEConfig | None:
    """The MoEConfig of ``config.moe``, routing at ``config.moe_threshold`` (its own start t when
    that is None: a budgeted model's trained t comes with the weights)."""
    if config.moe is None:
        return None
    fields = dict(config.moe)
    if config.moe_threshold is not None:
        fields["threshold"] = config.moe_threshold
    return MoEConfig(**fields)
