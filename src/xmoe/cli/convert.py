"""`xmoe convert`: a dense model made sparse (xmoe.conversion), written as a new folder.

An `xmoe train` run (a *-dense preset) becomes a new run folder:

    xmoe convert --checkpoint runs/dense --experts 8 --out runs/dense-x8 [--partition clustered]
                 [--calibration-tokens 16384] [--data PATH]
    xmoe eval --checkpoint runs/dense-x8 --threshold 0.8      # the compute dial
    xmoe sweep-threshold --checkpoint runs/dense-x8

A Hugging Face causal LM (GPT-2 or LLaMA-style, saved with save_pretrained together with its
tokenizer; needs `pip install 'xmoe[hf]'`) becomes a converted HF folder, calibrated on --data:

    xmoe convert --checkpoint my-gpt2 --experts 8 --out my-gpt2-x8 --data calibration.txt
    xmoe sweep-threshold --checkpoint my-gpt2-x8 --data held-out.txt
    xmoe.conversion.hf.load_converted("my-gpt2-x8")          # in Python
"""

from __future__ import annotations

from xmoe.errors import UsageError


def convert(*, checkpoint: str, experts: int, out: str, partition: str = "contiguous",
            calibration_tokens: int = 16384, data: str | None = None, device: str = "auto") -> None:
    """Split a dense model's FFNs (an xmoe GPT run or a Hugging Face folder) into experts.

    Args:
        checkpoint: run folder of a dense GPT (a *-dense preset), or a Hugging Face model folder
        experts: experts per FFN; must divide d_ff
        out: new folder for the converted model (must not exist)
        partition: how neurons are grouped: contiguous slices, or clustered by co-activation
        calibration_tokens: tokens of calibration text for clustering and router fitting
        data: calibration text (default: the run's training split; required for a Hugging Face model)
    """
    from xmoe.checkpoints import checkpoint_kind, expect
    from xmoe.conversion import ConversionConfig, convert_checkpoint

    if experts < 1:
        raise UsageError(f"--experts must be at least 1 (experts per FFN, dividing its d_ff), got {experts}")
    kind = checkpoint_kind(checkpoint)
    if kind.kind == "converted":
        raise UsageError(f"{checkpoint} is already converted (it holds xmoe_conversion.json); convert the "
                         f"dense model it came from instead")
    expect(kind, ("run", "hf-dense"), "convert")
    cfg = ConversionConfig(num_experts=experts, partition=partition)
    if kind.kind == "hf-dense":
        from xmoe.conversion.hf import convert_hf_checkpoint
        from xmoe.training.loop import resolve_device

        written, reports = convert_hf_checkpoint(checkpoint, out, cfg, data=data, calibration_tokens=calibration_tokens,
                                                 device=resolve_device(device))
        then = (f"xmoe sweep-threshold --checkpoint {written} --data HELD_OUT_TEXT   "
                f"(in Python: xmoe.conversion.hf.load_converted({str(written)!r}))")
    else:
        written, reports = convert_checkpoint(checkpoint, out, cfg, calibration_tokens=calibration_tokens, data=data,
                                              device=device)
        then = f"xmoe sweep-threshold --checkpoint {written}   (or xmoe eval --checkpoint {written} --threshold 0.8)"
    print(f"converted {checkpoint} -> {written}: {len(reports)} FFNs split into {experts} experts ({partition}), "
          f"routers fitted; t = 1.0 reproduces the dense model")
    print(f"next: {then}")


def partitions() -> tuple[str, ...]:
    """The choices of --partition (xmoe.conversion.partition, which imports torch: read when used)."""
    from xmoe.conversion.partition import PARTITIONS

    return PARTITIONS
