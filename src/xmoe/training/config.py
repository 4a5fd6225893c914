"""Run configuration: how to train (TrainConfig), and the machinery every task's run config
(xmoe.tasks) uses for its dotted overrides and its JSON form (config.json), parsed and checked by
jsonargparse.

    cfg = lm_run_config("cpu-xmoe-64x128", overrides={"model.moe.threshold": "0.8", "train.max_steps": "200"})
    apply_overrides(cfg, {"train.betas": "[0.9, 0.98]"})   # a tuple is a JSON list; None is null (or none)
    from_dict(LMRunConfig, json.loads(text))                # config.json, as to_dict wrote it

Why jsonargparse: one parser, made from the dataclasses' type hints, reads dotted values into
nested dataclasses, the optional ``model.moe`` included (``--model.moe.threshold=0.8``, where
tyro would make ``MoEConfig | None`` two subcommands to choose between), and checks a JSON object
against the same hints (unknown keys refused, missing keys take their defaults), so the flags and
config.json cannot drift apart. What stays here is what it does not do: naming the closest real
key for an unknown one, one-line messages, and ``model.moe.model_dim`` following
``model.d_model``. Every mistake is a UsageError naming the key; every dataclass re-validates
itself in ``__post_init__``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from jsonargparse import ArgumentError, ArgumentParser

from xmoe.errors import UsageError, check_counts

SCHEDULES = ("cosine", "inverse_sqrt", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
DP_IMPLS = ("fsdp", "allreduce")


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
    # Router sharpening, beyond the paper (docs/method.md, "Deviations"); off by default.
    entropy_loss_coef: float = 0.0  # times the sum over MoE layers of the mean router entropy
    router_lr_mult: float = 1.0  # the routers' learning rate is lr * router_lr_mult
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
        check_counts("train", max_steps=self.max_steps, batch_size=self.batch_size, seq_len=self.seq_len,
                     grad_accum=self.grad_accum, log_every=self.log_every, eval_batches=self.eval_batches)
        check_counts("train", minimum=0, eval_every=self.eval_every, save_every=self.save_every, seed=self.seed)
        if not 0 < self.lr < math.inf:
            raise UsageError(f"train.lr must be a positive finite number, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.warmup_fraction < 1:
            raise UsageError("train.min_lr_ratio must be in [0, 1] and train.warmup_fraction in [0, 1)")
        w = self.warmup_steps
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 0):
            raise UsageError(f"train.warmup_steps must be an integer >= 0 or None (use warmup_fraction), got {w!r}")
        span = self.schedule_steps
        if span is not None and (not isinstance(span, int) or isinstance(span, bool) or span < 1):
            raise UsageError(f"train.schedule_steps must be a positive integer or None (= max_steps), got {span!r}")
        for name, choices in (("schedule", SCHEDULES), ("precision", PRECISIONS), ("dp_impl", DP_IMPLS)):
            if getattr(self, name) not in choices:
                raise UsageError(f"train.{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise UsageError(f"train.betas must be two numbers in [0, 1) (Adam's moment decays), got "
                             f"{list(self.betas)}; e.g. --train.betas='[0.9, 0.95]'")
        if not 0 < self.router_lr_mult < math.inf:
            raise UsageError(f"train.router_lr_mult must be a positive finite number (1 = the paper's recipe), "
                             f"got {self.router_lr_mult!r}")
        for name in ("weight_decay", "grad_clip", "aux_loss_coef", "z_loss_coef", "entropy_loss_coef"):
            if not 0 <= getattr(self, name) < math.inf:
                raise UsageError(f"train.{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not 0 < self.collective_timeout_s < math.inf:
            raise UsageError(f"train.collective_timeout_s must be a positive number of seconds, "
                             f"got {self.collective_timeout_s!r}")


def apply_overrides(cfg: Any, overrides: dict[str, str]) -> Any:
    """A copy of ``cfg`` with dotted keys (``"model.moe.threshold"``) set from their text."""
    return with_overrides(type(cfg), to_dict(cfg), overrides)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: Any) -> Any:
    """The config dataclass ``cls`` from ``to_dict`` output (e.g. a config.json)."""
    if not isinstance(data, dict):
        raise UsageError(f"a {cls.__name__} must be a JSON object of fields, not {type(data).__name__}")
    parser = _parser(cls)
    with _one_line_errors():
        return _build(cls, parser, parser.parse_object(data))


def with_overrides(cls: type, defaults: dict, overrides: dict[str, str]) -> Any:
    """The run config ``cls`` from ``defaults`` (a dict of its fields) and dotted ``overrides``.

    Overrides are parsed on top of ``defaults`` and validated once, together, so that two
    fields checked against each other (train.seq_len, model.block_size) can change in one go.
    ``model.moe.model_dim`` follows ``model.d_model`` unless it is given too."""
    _check_keys(cls, defaults, overrides)
    if "model.d_model" in overrides and (defaults.get("model") or {}).get("moe") is not None:
        overrides = {"model.moe.model_dim": overrides["model.d_model"], **overrides}
    parser = _parser(cls)
    parser.set_defaults(defaults)
    with _one_line_errors():
        flags = [f"--{key}={flag_value(value)}" for key, value in overrides.items()]
        return _build(cls, parser, parser.parse_args(flags))


def flag_value(value: str) -> str:
    """An override's text as the parser takes it: None as null, and a JSON string (the README
    says values are JSON: --train.precision='"bf16"') without its quotes."""
    if value in ("none", "None"):
        return "null"
    if len(value) >= 2 and value[0] == value[-1] == '"':
        with contextlib.suppress(ValueError):
            decoded = json.loads(value)
            if isinstance(decoded, str):
                return decoded
    return value


def _parser(cls: type) -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False, allow_abbrev=False)
    parser.add_class_arguments(cls, nested_key=None)
    return parser


def _build(cls: type, parser: ArgumentParser, namespace) -> Any:
    init = parser.instantiate(namespace)  # the nested dataclasses; the top level is ours to build
    return cls(**{f.name: init[f.name] for f in dataclasses.fields(cls)})


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """jsonargparse's multi-line errors, and the dataclasses' own checks, as one UsageError."""
    try:
        yield
    except (ArgumentError, ValueError, TypeError) as err:
        raise UsageError(_one_line(str(err))) from None


def _one_line(text: str) -> str:
    """``Parser key "k": Expected a <class 'int'>. Got value: x`` -> ``config key 'k': expected
    int, got x``; of a union (``model.moe``, ``int | None``, nested), its first member's complaint."""
    keys = re.findall(r'Parser key "([^"]+)":', text)
    reason = re.split(r'Parser key "[^"]+":', text)[-1]
    union = "Errors:" in reason
    if union:
        errors = reason.rsplit("Errors:", 1)[-1]
        reason = re.search(r"- (?:Problem with given class_path '[^']*':\s*)?(.+)", errors).group(1)
        given = re.search(r"Given value: (?!Namespace|NestedArg)(.*)", text)
        reason += f". Got value: {given.group(1)}" if given else ""
    reason = re.sub(r"Expected a <class '(\w+)'>", r"expected \1", " ".join(reason.split()))
    reason = reason.replace(". Got value: ", ", got ")
    if "expected tuple" in reason:
        reason += " (write a tuple as a JSON list: [0.9, 0.95])"
    elif union and "NoneType" in text and reason.startswith("expected"):
        reason += " (or null for None)"
    return f"config key {'.'.join(keys)!r}: {reason}" if keys else reason


def config_keys(cls: type) -> list[str]:
    """The dotted keys an override may set (``preset`` is chosen and ``task`` fixed, not overridden)."""
    return [key for key in _leaf_keys(cls) if key not in ("preset", "task")]


def check_config_keys(cls: type, keys: list[str]) -> None:
    """A UsageError for the first key that is no field of ``cls``, naming the closest real ones."""
    leaves = _leaf_keys(cls)
    for key in keys:
        if key in leaves:
            continue
        if any(leaf.startswith(key + ".") for leaf in leaves):
            raise UsageError(f"config key {key!r} is a section; set one of its fields, e.g. --{key}.FIELD=VALUE")
        guess = difflib.get_close_matches(key, leaves, n=1) or _keys_named_like(key.rsplit(".", 1)[-1], leaves)
        hint = (f"; did you mean {' or '.join(f'{g!r} (--{g}=VALUE)' for g in guess)}?" if guess
                else f"; known keys: {', '.join(leaves)}")
        raise UsageError(f"unknown config key {key!r} (--{key}){hint}")


def _check_keys(cls: type, defaults: dict, overrides: dict[str, str]) -> None:
    """Keys that are no field, and fields of a section that is None in ``defaults``."""
    check_config_keys(cls, list(overrides))
    for key in overrides:
        value, parts = defaults, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            value = value[part]
            if value is None:
                section = ".".join(parts[:depth + 1])
                raise UsageError(f"cannot set {key!r}: {section} is None in this config (e.g. a dense preset has no "
                                 f"model.moe); pick a preset that has it")


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key below the config class ``cls``."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        inner = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)
        keys += _leaf_keys(inner, f"{prefix}{name}.") if inner is not None else [prefix + name]
    return keys


def _keys_named_like(word: str, keys: list[str]) -> list[str]:
    """Keys whose last part contains ``word`` or is close to it (``steps`` -> ``train.max_steps``)."""
    last = {key: key.rsplit(".", 1)[-1] for key in keys}
    close = set(difflib.get_close_matches(word, list(last.values()), n=3))
    return [key for key, name in last.items() if name in close or (len(word) >= 3 and word in name)][:3]
