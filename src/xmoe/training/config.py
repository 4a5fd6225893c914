"""Run configuration: typed dataclasses, dotted command-line overrides, JSON round trip.

    cfg = lm_run_config("cpu-xmoe-64x128", overrides={"model.moe.threshold": "0.8",
                                                      "train.max_steps": "200"})
    save_json(cfg)  ->  config.json next to every checkpoint, so `xmoe eval` needs no flags.

Overrides are applied to the nested dataclasses by name; an unknown key or a value that does not
parse as the field's type is a ValueError naming the key. Every dataclass re-validates itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from xmoe.data import DataConfig
from xmoe.models.gpt import GPTConfig
from xmoe.presets import get_preset

SCHEDULES = ("cosine", "inverse_sqrt", "constant")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train: the recipe of XMoE's LM experiments (docs/method.md), scaled by the preset."""

    max_steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 128  # tokens per sequence (<= the model's block_size)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio (paper: 4.5e-4 -> 4.5e-6)
    warmup_fraction: float = 0.1  # of max_steps (paper: 10%)
    warmup_steps: int | None = None  # fixed warm-up steps; overrides warmup_fraction when set (MT: 512)
    schedule: str = "cosine"
    schedule_steps: int | None = None  # steps the warm-up fraction and cosine span; None: max_steps
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1  # not applied to norms, biases, embeddings
    grad_clip: float = 1.0  # 0 disables
    aux_loss_coef: float = 0.01  # times the sum over MoE layers of the balancing loss
    z_loss_coef: float = 0.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 20
    save_every: int = 200  # 0: only at the end
    device: str = "auto"  # auto: cuda if available, else cpu
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model
    # Distributed runs (docs/distributed.md): how dense parameters are kept in step, and how long
    # a collective waits for a rank that died or hangs before every rank stops with an error.
    dp_impl: str = "fsdp"  # fsdp (sharded, FSDP2) or allreduce (replicated, one all_reduce per step)
    reshard_after_forward: bool = True  # fsdp: free gathered parameters after forward
    collective_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"train.{name} must be a non-negative integer, got {value!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"train.lr must be a positive finite number, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.warmup_fraction < 1:
            raise ValueError("train.min_lr_ratio must be in [0, 1] and train.warmup_fraction in [0, 1)")
        w = self.warmup_steps
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 0):
            raise ValueError(f"train.warmup_steps must be an integer >= 0 or None (use warmup_fraction), got {w!r}")
        span = self.schedule_steps
        if span is not None and (not isinstance(span, int) or isinstance(span, bool) or span < 1):
            raise ValueError(f"train.schedule_steps must be a positive integer or None (= max_steps), got {span!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        for name in ("weight_decay", "grad_clip", "aux_loss_coef", "z_loss_coef"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"train.{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.dp_impl not in ("fsdp", "allreduce"):
            raise ValueError(f"train.dp_impl={self.dp_impl!r} is not one of fsdp, allreduce")
        if not 0 < self.collective_timeout_s < math.inf:
            raise ValueError(f"train.collective_timeout_s must be a positive number of seconds, got {self.collective_timeout_s!r}")


@dataclass(frozen=True, kw_only=True)
class LMRunConfig:
    """Everything a language-model run needs; saved as config.json with each checkpoint."""

    preset: str
    model: GPTConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.block_size:
            raise ValueError(
                f"train.seq_len={self.train.seq_len} exceeds model.block_size={self.model.block_size}; "
                f"lower train.seq_len or raise model.block_size"
            )


def lm_run_config(preset: str, *, vocab_size: int | None = None, overrides: dict[str, str] | None = None,
                  **sections: Any) -> LMRunConfig:
    """The run config of a GPT preset, with ``sections`` (data=..., train=...) and overrides.

    Without a train section, ``train.seq_len`` defaults to at most the preset's context length.
    """
    model = get_preset(preset, vocab_size=vocab_size)
    train = sections.pop("train", None) or TrainConfig(seq_len=min(TrainConfig.seq_len, model.block_size))
    data = {"preset": preset, "model": to_dict(model), "data": to_dict(sections.pop("data", DataConfig())),
            "train": to_dict(train)}
    if sections:
        raise TypeError(f"unknown config sections: {', '.join(sections)}")
    return _with_overrides(LMRunConfig, data, overrides or {})


def apply_overrides(cfg: Any, overrides: dict[str, str]) -> Any:
    """A copy of ``cfg`` with dotted keys (``"model.moe.threshold"``) set from strings."""
    return _with_overrides(type(cfg), to_dict(cfg), overrides)


def _with_overrides(cls: type, data: dict, overrides: dict[str, str]) -> Any:
    """Overrides are set on the plain dict first and validated once, together, so that two
    fields checked against each other (train.seq_len, model.block_size) can change in one go.
    ``model.moe.model_dim`` follows ``model.d_model`` unless it is given too."""
    for key, text in overrides.items():
        _set(cls, data, key, text)
    model = data.get("model") or {}
    if "model.d_model" in overrides and "model.moe.model_dim" not in overrides and model.get("moe"):
        model["moe"]["model_dim"] = model["d_model"]
    return from_dict(cls, data)


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["--train.max_steps=200", "--model.moe.threshold", "0.8"]`` -> a key/value dict."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"unexpected argument {arg!r}; config overrides look like --train.max_steps=200")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ValueError(f"override --{key} has no value; write --{key}=VALUE")
            value, i = args[i + 1], i + 1
        out[key.replace("-", "_")] = value
        i += 1
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict, *, prefix: str = "") -> Any:
    """Rebuild a (nested) config dataclass from ``to_dict`` output (e.g. a config.json); unknown
    keys and values of the wrong JSON type are ValueErrors naming the dotted key."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'the config'} must be a JSON object of fields, "
                         f"not {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown config keys for {cls.__name__}: {', '.join(prefix + k for k in sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        inner = _dataclass_of(hints[name])
        if inner is not None and value is not None:
            value = from_dict(inner, value, prefix=f"{prefix}{name}.")
        else:
            value = _checked(hints[name], value, prefix + name)
        kwargs[name] = value
    return cls(**kwargs)


_JSON_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _checked(tp: Any, value: Any, key: str) -> Any:
    """``value`` (as JSON gives it) if it has the type ``tp`` asks for; lists become tuples."""
    if _is_optional(tp):
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(tp)
    if ok is not None and not ok(value):
        raise ValueError(f"config key {key!r} must be {_JSON_KIND[tp]}, got {value!r} ({type(value).__name__})")
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"config key {key!r} must be a list of {len(args)} values, got {value!r}")
        return tuple(_checked(a, v, key) for a, v in zip(args, value))
    return value


def _set(cls: type, data: dict, key: str, text: str) -> None:
    parts = key.split(".")
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            prefix = ".".join(parts[:depth])
            choices = [f"{prefix}.{n}" if prefix else n for n in hints]
            guess = difflib.get_close_matches(key, choices, n=1) or _keys_named_like(parts[-1], _leaf_keys(cls, prefix))
            hint = (f"; did you mean {' or '.join(f'{g!r} (--{g}=VALUE)' for g in guess)}?" if guess
                    else f"; known keys here: {', '.join(choices)}")
            raise ValueError(f"unknown config key {key!r} (--{key}){hint}")
        if depth == len(parts) - 1:
            if _dataclass_of(hints[part]) is not None:
                raise ValueError(f"config key {key!r} is a section; set one of its fields, e.g. {key}.FIELD=VALUE")
            data[part] = _parse(hints[part], text, key)
            return
        cls = _dataclass_of(hints[part])
        if cls is None:
            raise ValueError(f"config key {'.'.join(parts[:depth + 1])!r} has no fields; cannot set {key!r}")
        if data[part] is None:
            raise ValueError(
                f"cannot set {key!r}: {'.'.join(parts[:depth + 1])} is None in this config "
                f"(e.g. a dense preset has no model.moe); pick a preset that has it"
            )
        data = data[part]


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key below the config class ``cls``."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        dotted = f"{prefix}.{name}" if prefix else name
        inner = _dataclass_of(tp)
        keys += _leaf_keys(inner, dotted) if inner is not None else [dotted]
    return keys


def _keys_named_like(word: str, keys: list[str]) -> list[str]:
    """Keys whose last part contains ``word`` or is close to it (``steps`` -> ``train.max_steps``)."""
    last = {key: key.rsplit(".", 1)[-1] for key in keys}
    close = set(difflib.get_close_matches(word, list(last.values()), n=3))
    return [key for key, name in last.items() if name in close or (len(word) >= 3 and word in name)][:3]


def _parse(tp: Any, text: str, key: str) -> Any:
    args = typing.get_args(tp)
    if _is_optional(tp):
        if text.lower() in ("none", "null"):
            return None
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)
    try:
        if tp is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typing.get_origin(tp) is tuple:
            items = [s for s in text.replace("(", "").replace(")", "").split(",") if s.strip()]
            if len(items) != len(args):
                raise ValueError
            return tuple(_parse(a, s.strip(), key) for a, s in zip(args, items))
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
    except ValueError:
        pass
    raise ValueError(f"config key {key!r}: cannot read {text!r} as {_type_name(tp)}")


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _dataclass_of(tp: Any) -> type | None:
    if _is_optional(tp):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp if dataclasses.is_dataclass(tp) else None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return "a comma-separated tuple of " + ", ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))
