"""Search spaces for `p5ray tune`: one YAML file -> a Ray Tune param space and each trial's Config.

The file (tune/search_space.yaml is the commented reference):

    base:      fixed config overrides for every trial, {section: {key: value}}
    space:     dotted config key -> {distribution: [args]}, e.g. train.lr: {loguniform: [1e-4, 1e-2]}
    simplex:   {tasks: [recall, rank, cross_sell, rating], sum: 1.0}  task weights on the simplex
    metric, mode                     what ranks epochs and trials (valid/ndcg@10, max)
    objective: {metric: weight}      or a weighted sum of reported metrics instead
    scheduler: asha | pbt | fifo     or {type: asha, grace_period: 1, reduction_factor: 2}
    search:    random | optuna       or {type: optuna}
    seed, num_samples, max_concurrent_trials, workers_per_trial, cpus_per_worker, data_cpus

Simplex weights are Dirichlet(1, ..., 1): each task gets u ~ U(0, 1), its weight is
sum * (-log u) / sum_t (-log u_t) (normalised Exp(1) draws). Sampling u keeps every search
algorithm, Optuna included, on ordinary bounded dimensions. Pure Python: no Ray cluster needed.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p5ray.config import Config, apply_overrides, from_dict, read_yaml, to_dict
from p5ray.errors import ConfigError
from p5ray.tasks import TASK_NAMES as TASKS

# what a validated epoch reports (train._validate and the loss terms of run_epoch)
KNOWN_METRICS = (
    "valid/ndcg@10", "valid/hr@10", "valid/ndcg@20", "valid/hr@20", "valid/mrr",
    "loss/total", *(f"loss/{t}" for t in TASKS),
)
# distribution -> (Tune function name, argument names); ints: the kinds that return integers
DISTRIBUTIONS = {
    "uniform": ("uniform", ("lower", "upper")),
    "loguniform": ("loguniform", ("lower", "upper")),
    "quniform": ("quniform", ("lower", "upper", "q")),
    "qloguniform": ("qloguniform", ("lower", "upper", "q")),
    "normal": ("randn", ("mean", "sd")),
    "randint": ("randint", ("lower", "upper")),  # upper exclusive, as in Ray Tune
    "qrandint": ("qrandint", ("lower", "upper", "q")),  # upper inclusive, as in Ray Tune
    "lograndint": ("lograndint", ("lower", "upper")),
    "choice": ("choice", ("values",)),
    "grid": ("grid_search", ("values",)),
}
INT_KINDS = {"randint", "qrandint", "lograndint", "choice", "grid"}
LOG_KINDS = {"loguniform", "qloguniform", "lograndint"}
# keys PBT may change in the middle of a run (shapes and schedules may not)
PBT_MUTABLE = ("train.lr", "train.weight_decay", "train.grad_clip", "model.dropout", "model.emb_dropout", "loss.", "simplex.")
SCHEDULERS = {
    "asha": {"grace_period": 1, "reduction_factor": 2},
    "pbt": {"perturbation_interval": 1, "quantile_fraction": 0.25, "resample_probability": 0.25, "mutations": None},
    "fifo": {},
}
SEARCHERS = ("random", "optuna")
TOP_KEYS = {
    "base", "space", "simplex", "metric", "mode", "objective", "scheduler", "search", "seed",
    "num_samples", "max_concurrent_trials", "workers_per_trial", "cpus_per_worker", "data_cpus",
}


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted config key (or simplex.<task>)
    kind: str  # a DISTRIBUTIONS name
    args: tuple

    def domain(self):
        """The Ray Tune sampler (or grid) for this dimension."""
        from ray import tune

        name, _ = DISTRIBUTIONS[self.kind]
        return getattr(tune, name)(*self.args)

    @property
    def log_scale(self) -> bool:
        return self.kind in LOG_KINDS


@dataclass(frozen=True)
class Sweep:
    base: dict = field(default_factory=dict)
    dims: tuple[Dimension, ...] = ()
    simplex: tuple[str, ...] = ()  # tasks whose weights lie on the simplex
    simplex_sum: float = 1.0
    metric: str = "valid/ndcg@10"
    mode: str = "max"
    objective: dict | None = None  # metric -> weight; then metric == "objective"
    scheduler: dict = field(default_factory=lambda: {"type": "asha", **SCHEDULERS["asha"]})
    search: dict = field(default_factory=lambda: {"type": "random"})
    seed: int | None = None
    num_samples: int = 8
    max_concurrent_trials: int | None = None  # None: as many as the cluster fits
    workers_per_trial: int = 1
    cpus_per_worker: int = 1
    data_cpus: int = 1  # CPUs no trial may take, so Ray Data inside trials never starves

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Sweep:
        """The inverse of to_dict (sweep.json of a sweep directory)."""
        dims = tuple(Dimension(d["key"], d["kind"], tuple(d["args"])) for d in data["dims"])
        return cls(**{**data, "dims": dims, "simplex": tuple(data["simplex"])})


def load_sweep(path: str | Path, num_samples: int | None = None) -> Sweep:
    sweep = parse_sweep(read_yaml(path), str(path))
    return dataclasses.replace(sweep, num_samples=num_samples) if num_samples else sweep


def parse_sweep(data: dict, where: str = "search space") -> Sweep:
    """Validate a search-space mapping; every error names the offending key."""
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {', '.join(unknown)}", f"known keys: {', '.join(sorted(TOP_KEYS))}")
    base = data.get("base") or {}
    from_dict(base)  # names any unknown or mistyped base key
    space = data.get("space") or {}
    if not isinstance(space, dict):
        raise ConfigError(f"{where}: space must map dotted config keys to distributions")
    dims = [parse_dimension(key, spec) for key, spec in space.items()]
    simplex, simplex_sum = _parse_simplex(data.get("simplex"), {d.key for d in dims})
    dims += [Dimension(f"simplex.{t}", "uniform", (0.0, 1.0)) for t in simplex]
    objective = data.get("objective")
    metric, mode = data.get("metric", "valid/ndcg@10"), data.get("mode", "max")
    if objective is not None:
        if not isinstance(objective, dict) or not objective:
            raise ConfigError(f"{where}: objective must map metric names to weights")
        for key, weight in objective.items():
            _check_metric(key)
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise ConfigError(f"objective.{key}: weight must be a number, got {weight!r}")
        metric, objective = "objective", {k: float(w) for k, w in objective.items()}
    else:
        _check_metric(metric)
    if mode not in ("max", "min"):
        raise ConfigError(f"mode: {mode!r} is not one of max, min")
    sweep = Sweep(
        base=base, dims=tuple(dims), simplex=simplex, simplex_sum=simplex_sum, metric=metric, mode=mode,
        objective=objective, scheduler=_parse_choice("scheduler", data.get("scheduler", "asha"), SCHEDULERS),
        search=_parse_choice("search", data.get("search", "random"), {s: {} for s in SEARCHERS}),
        seed=_positive("seed", data.get("seed"), minimum=0, optional=True),
        num_samples=_positive("num_samples", data.get("num_samples", 8)),
        max_concurrent_trials=_positive("max_concurrent_trials", data.get("max_concurrent_trials"), optional=True),
        workers_per_trial=_positive("workers_per_trial", data.get("workers_per_trial", 1)),
        cpus_per_worker=_positive("cpus_per_worker", data.get("cpus_per_worker", 1)),
        data_cpus=_positive("data_cpus", data.get("data_cpus", 1), minimum=0),
    )
    if sweep.search["type"] == "optuna" and any(d.kind == "grid" for d in sweep.dims):
        raise ConfigError("search: optuna cannot take grid dimensions", "use choice instead of grid")
    _check_pbt(sweep)
    return sweep


def parse_dimension(key: str, spec: Any) -> Dimension:
    """`train.lr`, `{loguniform: [1e-4, 1e-2]}` -> Dimension; a bare list means `choice`."""
    tp = field_type(key)
    if isinstance(spec, list):
        spec = {"choice": spec}
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(
            f"space.{key}: expected one distribution, e.g. {{loguniform: [0.0001, 0.01]}}",
            "fixed values belong under base:",
        )
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"space.{key}: unknown distribution {kind!r}", f"one of {', '.join(DISTRIBUTIONS)}")
    names = DISTRIBUTIONS[kind][1]
    if names == ("values",):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"space.{key}: {kind} needs a non-empty list of values")
        for value in args:
            check_value(key, value)
        return Dimension(key, kind, (list(args),))
    if not isinstance(args, list) or len(args) != len(names):
        raise ConfigError(f"space.{key}: {kind} takes [{', '.join(names)}], got {args!r}")
    if any(isinstance(a, bool) or not isinstance(a, int | float) for a in args):
        raise ConfigError(f"space.{key}: {kind} arguments must be numbers, got {args!r}")
    if tp is int and kind not in INT_KINDS:
        raise ConfigError(f"space.{key}: an integer key needs randint, qrandint, lograndint, choice or grid, not {kind}")
    if tp is not int and tp is not float:
        raise ConfigError(f"space.{key}: a {getattr(tp, '__name__', tp)} key can only be swept with choice or grid")
    if "lower" in names:
        lower, upper = args[0], args[1]
        if not lower < upper:
            raise ConfigError(f"space.{key}: lower bound {lower} must be below upper bound {upper}")
        if kind in LOG_KINDS and lower <= 0:
            raise ConfigError(f"space.{key}: {kind} needs a positive lower bound, got {lower}")
        check_value(key, lower)
    if kind == "normal" and args[1] <= 0:
        raise ConfigError(f"space.{key}: normal needs a positive sd, got {args[1]}")
    dim = Dimension(key, kind, tuple(args))
    try:
        dim.domain()
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"space.{key}: {exc}") from None
    return dim


def field_type(key: str) -> type:
    """The Python type of a dotted config key; ConfigError naming the key if there is none."""
    parts = key.split(".")
    cls: Any = Config
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            raise ConfigError(f"space: unknown config key {key}", "see p5ray/configs/default.yaml for the keys")
        cls = hints[part]
        if dataclasses.is_dataclass(cls) and i == len(parts) - 1:
            raise ConfigError(f"space: {key} is a section, not a key")
    return cls


def check_value(key: str, value: Any) -> None:
    """Type-check one value for a dotted key by building a Config with it."""
    from_dict(_nested(key, value))


def _nested(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _parse_simplex(spec: Any, swept: set[str]) -> tuple[tuple[str, ...], float]:
    if spec in (None, False):
        return (), 1.0
    if spec is True:
        spec = {}
    if isinstance(spec, list):
        spec = {"tasks": spec}
    if not isinstance(spec, dict) or set(spec) - {"tasks", "sum"}:
        raise ConfigError("simplex: expected {tasks: [recall, rank, ...], sum: 1.0}")
    tasks = tuple(spec.get("tasks") or TASKS)
    for task in tasks:
        if task not in TASKS:
            raise ConfigError(f"simplex.tasks: unknown task {task!r}", f"tasks are {', '.join(TASKS)}")
        if f"loss.alpha.{task}" in swept:
            raise ConfigError(f"simplex: loss.alpha.{task} is also under space; sweep it one way")
    if len(set(tasks)) != len(tasks) or len(tasks) < 2:
        raise ConfigError("simplex.tasks: name at least two different tasks")
    total = spec.get("sum", 1.0)
    if isinstance(total, bool) or not isinstance(total, int | float) or total <= 0:
        raise ConfigError(f"simplex.sum: expected a positive number, got {total!r}")
    return tasks, float(total)


def _parse_choice(name: str, spec: Any, options: dict[str, dict]) -> dict:
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict) or spec.get("type") not in options:
        raise ConfigError(f"{name}: expected one of {', '.join(options)}, got {spec!r}")
    defaults = options[spec["type"]]
    unknown = sorted(set(spec) - set(defaults) - {"type"})
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown option for {spec['type']}", f"options: {', '.join(defaults) or 'none'}")
    return {"type": spec["type"], **defaults, **{k: v for k, v in spec.items() if k != "type"}}


def _positive(name: str, value: Any, minimum: int = 1, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _check_metric(metric: str) -> None:
    if metric not in KNOWN_METRICS:
        raise ConfigError(f"metric {metric!r} is not reported by training", f"one of {', '.join(KNOWN_METRICS)}")


def _check_pbt(sweep: Sweep) -> None:
    sched = sweep.scheduler
    if sched["type"] != "pbt":
        return
    if sweep.search["type"] != "random":
        raise ConfigError(f"scheduler pbt works with search: random only, not {sweep.search['type']}", "PBT proposes its own configs")
    swept = [d.key for d in sweep.dims if d.kind != "grid"]
    mutations = sched["mutations"] if sched["mutations"] is not None else [k for k in swept if k.startswith(PBT_MUTABLE)]
    for key in mutations:
        if key not in swept:
            raise ConfigError(f"scheduler.mutations: {key} is not a sampled dimension under space")
        if not key.startswith(PBT_MUTABLE):
            raise ConfigError(f"scheduler.mutations: {key} cannot change in the middle of training", "mutate lr, weight decay, dropout or loss weights")
    if not mutations:
        raise ConfigError("scheduler pbt: nothing to mutate", "sweep train.lr, dropout or loss weights under space")
    sched["mutations"] = list(mutations)


# -- from a sampled point to a trial's Config ------------------------------------------------


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in (extra or {}).items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def base_config(sweep: Sweep, config_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """defaults <- --config <- the sweep's base <- resources <- --set: what every trial starts from."""
    data = read_yaml(config_path) if config_path else {}
    data = deep_merge(data, sweep.base)
    data = deep_merge(data, {"train": {"num_workers": sweep.workers_per_trial, "cpus_per_worker": sweep.cpus_per_worker}})
    swept = {d.key for d in sweep.dims} | {f"loss.alpha.{t}" for t in sweep.simplex}
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        if key in swept:
            raise ConfigError(f"--set {key}: that key is swept by the search space", "drop the --set or the dimension")
    data = apply_overrides(data, overrides)
    return to_dict(from_dict(data))


def trial_config(base: dict, point: dict, sweep: Sweep) -> Config:
    """The full Config of one trial: base + the sampled values (+ simplex weights)."""
    data = base
    for key, value in point.items():
        if not key.startswith("simplex."):
            data = deep_merge(data, _nested(key, value))
    if sweep.simplex:
        data = deep_merge(data, {"loss": {"alpha": simplex_weights(point, sweep)}})
    return from_dict(data)


def sample_point(sweep: Sweep) -> dict:
    """One random point of the space (a grid dimension gives its first value)."""
    return {d.key: d.args[0][0] if d.kind == "grid" else d.domain().sample() for d in sweep.dims}


def simplex_weights(point: dict, sweep: Sweep) -> dict[str, float]:
    """u_t ~ U(0,1) per task -> Dirichlet(1) weights scaled to sweep.simplex_sum."""
    draws = {t: -math.log(min(max(float(point[f"simplex.{t}"]), 1e-12), 1.0 - 1e-12)) for t in sweep.simplex}
    total = sum(draws.values())
    return {t: sweep.simplex_sum * d / total for t, d in draws.items()}


def swept_values(cfg: Config, sweep: Sweep) -> dict[str, Any]:
    """The values a trial actually trained with, for every swept key (simplex: the weights)."""
    keys = [d.key for d in sweep.dims if not d.key.startswith("simplex.")]
    keys += [f"loss.alpha.{t}" for t in sweep.simplex]
    out = {}
    for key in keys:
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        out[key] = node
    return out
