"""Configuration: frozen dataclasses per stage, loaded from one YAML with `--set` overrides.

    cfg = load_config("configs/beauty.yaml", ["train.lr=0.002", "loss.alpha.rank=0.5"])

Every key has a default here, documented in `p5ray/configs/default.yaml` (a test keeps the two in
step). Unknown keys and values of the wrong type are rejected with the dotted key named.
Convert to plain dicts (`to_dict`) only at Ray's boundary.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from p5ray.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 64  # width of item embeddings and of the transformer
    layers: int = 2  # transformer blocks in the shared encoder
    heads: int = 2  # attention heads per block
    dropout: float = 0.3  # dropout in the encoder and towers
    emb_dropout: float = 0.3  # dropout on the summed item + position embeddings
    max_len: int = 50  # most recent items the encoder sees
    mixture: Literal["shared_bottom", "mmoe", "ple"] = "shared_bottom"  # how task towers share experts
    experts: int = 4  # experts for mmoe / ple (ple: shared experts; each task adds its own)
    tower_dim: int = 64  # hidden width of the rank / rating towers
    use_features: bool = True  # embed user / item feature columns when the data has them


@dataclass(frozen=True)
class AlphaConfig:
    recall: float = 1.0
    rank: float = 0.2
    cross_sell: float = 0.2
    rating: float = 0.2


@dataclass(frozen=True)
class LossConfig:
    alpha: AlphaConfig = field(default_factory=AlphaConfig)  # task weights in sum_i alpha_i L_i
    weighting: Literal["fixed", "uncertainty", "gradnorm"] = "fixed"  # how alphas evolve
    gradnorm_alpha: float = 1.5  # restoring-force exponent of GradNorm
    recall_loss: Literal["auto", "full_softmax", "sampled_softmax", "bce"] = "auto"  # recall objective over the catalog
    full_softmax_max_items: int = 20000  # "auto" uses full softmax up to this catalog size
    num_negatives: int = 1024  # shared negatives per batch for sampled softmax / bce
    logq_correction: bool = True  # subtract log sampling probability in sampled softmax
    rank_negatives: int = 4  # sampled negatives per positive for the rank task
    label_smoothing: float = 0.0  # on the recall softmax
    contrastive: float = 0.0  # weight of the contrastive auxiliary loss on recall states (0: off)
    contrastive_temperature: float = 0.2  # softmax temperature of that loss (cosine similarities)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40  # passes over the training windows (early stopping may end sooner)
    lr: float = 0.001  # peak AdamW learning rate
    batch_size: int = 128  # sequences per worker per step
    weight_decay: float = 0.0  # AdamW decay on weight matrices (not biases or norms)
    warmup_epochs: float = 1.0  # linear warmup, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.05  # the cosine schedule ends at this fraction of lr
    grad_clip: float = 1.0  # max global grad norm (0 disables)
    seed: int = 42  # model init, shuffling and negative sampling
    patience: int = 10  # stop after this many epochs without a better valid/ndcg@10 (0: never)
    eval_every: int = 1  # validate every N epochs
    num_workers: int = 2  # Ray Train workers (overridden by --num-workers)
    cpus_per_worker: int = 1  # logical CPUs Ray reserves per worker
    threads_per_worker: int = 0  # torch threads per worker (0: cpus_per_worker)
    use_gpu: bool = False  # one GPU per worker (overridden by --use-gpu)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    max_failures: int = 2  # Ray Train FailureConfig: restarts from the latest checkpoint
    keep_checkpoints: int = 2  # checkpoints kept besides the best one
    valid_users: int = 0  # validate on a fixed random subset of users (0: all)
    bucket_by_length: bool = True  # batch windows of similar length together (less padding)


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (5, 10, 20)  # cut-offs of HR@k and NDCG@k
    sampled_negatives: int = 99  # P5 protocol: 1 positive + 99 items the user never touched
    chunk_items: int = 65536  # items scored per chunk in full ranking (bounds memory)
    batch_users: int = 512  # users scored at once in evaluation
    seed: int = 2022  # sampled negatives of the sampled protocol


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def to_dict(obj: Any) -> Any:
    """A config (or section) as plain dicts/lists, ready for YAML, JSON or Ray."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def from_dict(data: dict | None, cls: type = Config, prefix: str = "") -> Any:
    """Build `cls` from a (partial) dict; unknown keys and wrong types raise ConfigError."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = ", ".join(f"{prefix}{k}" for k in unknown)
        raise ConfigError(f"unknown config key {where}", f"known keys: {', '.join(sorted(names))}")
    values = {}
    for name, raw in data.items():
        key = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = from_dict(raw, tp, key + ".")
        else:
            values[name] = _coerce(raw, tp, key)
    return cls(**values)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[]") for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested dict copy."""
    data = _deep_copy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if len(parts) < 2:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from None
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in (data or {}).items()}


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", "check the --config path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `--set` overrides, validated into a frozen Config."""
    data = read_yaml(path) if path else {}
    return from_dict(apply_overrides(data, overrides))


def replace(cfg: Config, **sections: Any) -> Config:
    """A copy of cfg with some fields of some sections replaced: replace(cfg, train={"epochs": 1})."""
    changed = {name: dataclasses.replace(getattr(cfg, name), **kw) for name, kw in sections.items()}
    return dataclasses.replace(cfg, **changed)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _field_comments() -> dict[tuple[str, str], str]:
    """The `# comment` after each field in this file, keyed by (class, field)."""
    comments, cls, pending = {}, None, None
    for line in inspect.getsource(__import__(__name__, fromlist=["_"])).splitlines():
        match = re.match(r"class (\w+)", line)
        if match:
            cls = match.group(1)
        match = re.match(r"\s+(\w+): .*?=.*?#\s*(.*)$", line)
        if match and cls:
            comments[(cls, match.group(1))] = match.group(2)
        elif pending and "#" in line:  # a default wrapped onto the next line, comment there
            comments[(cls, pending)] = line.split("#", 1)[1].strip()
        match = re.match(r"\s+(\w+): .*= \($", line)
        pending = match.group(1) if match else None
    return comments


def render_defaults() -> str:
    """p5ray/configs/default.yaml: every key, its default and its comment, from the dataclasses."""
    comments = _field_comments()
    out = [
        "# p5ray configuration: every key with its default. Copy, edit, pass with --config;",
        "# override single keys with --set section.key=value. Generated from p5ray/config.py by",
        "# `python -m p5ray.config` (a test keeps the two in step).",
        "",
    ]

    def emit(obj: Any, indent: int) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            note = comments.get((type(obj).__name__, f.name))
            tail = f"  # {note}" if note else ""
            if dataclasses.is_dataclass(value):
                out.append(" " * indent + f"{f.name}:{tail}")
                emit(value, indent + 2)
            else:
                text = yaml.safe_dump(to_dict(value), default_flow_style=True).strip()
                text = text.removesuffix("...").strip()
                out.append(" " * indent + f"{f.name}: {text}{tail}")

    for f in dataclasses.fields(Config):
        out.append(f"{f.name}:")
        emit(getattr(Config(), f.name), 2)
        out.append("")
    return "\n".join(out)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {typing.get_args(tp)[0].__name__}"
    return getattr(tp, "__name__", str(tp))


def render_markdown() -> str:
    """The configuration reference of the README: one table per section, from the dataclasses."""
    comments = _field_comments()
    out = []

    def emit(cls: type, obj: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                emit(type(value), value, f"{prefix}{f.name}.")
                continue
            default = yaml.safe_dump(to_dict(value), default_flow_style=True).strip().removesuffix("...").strip()
            note = comments.get((cls.__name__, f.name), "")
            if f.name in AlphaConfig.__dataclass_fields__ and cls is AlphaConfig:
                note = note or f"weight of the {f.name} task's loss (0 leaves the task out)"
            out.append(f"| `{prefix}{f.name}` | {_type_name(hints[f.name])} | `{default}` | {note} |")

    for f in dataclasses.fields(Config):
        out += [f"#### `{f.name}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        emit(type(getattr(Config(), f.name)), getattr(Config(), f.name), f"{f.name}.")
        out.append("")
    return "\n".join(out)


README_MARKERS = ("<!-- config-reference:begin -->", "<!-- config-reference:end -->")


def embed_reference(readme: str) -> str:
    """`readme` with the text between README_MARKERS replaced by render_markdown()."""
    begin, end = README_MARKERS
    head, _, rest = readme.partition(begin)
    _, _, tail = rest.partition(end)
    return f"{head}{begin}\n{render_markdown()}{end}{tail}"


if __name__ == "__main__":
    import sys

    if "--markdown" in sys.argv[1:]:  # the README's configuration reference
        print(render_markdown(), end="")
    elif "--readme" in sys.argv[1:]:  # python -m p5ray.config --readme README.md: refresh it in place
        readme = Path(sys.argv[sys.argv.index("--readme") + 1])
        readme.write_text(embed_reference(readme.read_text()))
    else:
        (Path(__file__).parent / "configs" / "default.yaml").write_text(render_defaults())
