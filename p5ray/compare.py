"""`p5ray report --compare CKPT CKPT ...`: one Markdown table comparing checkpoints.

Each checkpoint's recorded validation metrics (its meta.json); with `--data DIR`, also its offline
metrics on that data's test (or valid) split, computed by `p5ray evaluate`'s code. The best value of
each column is bold; config keys that differ between the checkpoints are listed under the table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from p5ray import checkpoint as ckpt
from p5ray.report import finite, fmt_number
from p5ray.tracking import flatten

log = logging.getLogger(__name__)
RECORDED = ("valid/ndcg@10", "valid/hr@10", "loss/total")
EVALUATED = ("full/ndcg@10", "full/hr@10", "full/mrr", "full_unmasked/ndcg@10", "sampled/hr@10",
             "rank/auc", "cross_sell/auc", "cross_sell/hr@10", "rating/rmse", "rating/mae")
LOWER_IS_BETTER = ("loss/", "rmse", "mae")


def compare(checkpoints: list[str], data_dir: str | None = None, split: str = "test", out: str = "compare.md") -> Path:
    """Write the comparison of `checkpoints` to `out`; return its absolute path."""
    entries = []
    for path in checkpoints:
        meta = ckpt.read_meta(path)  # a missing or foreign directory: one-line CheckpointError
        config_file = Path(path) / "config.yaml"
        config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
        entries.append({"path": Path(path).resolve(), "meta": meta, "config": config or {}, "evaluated": {}})
    if data_dir:
        from p5ray import evaluate

        _check_fit(entries, data_dir)  # every checkpoint before evaluating any
        for entry in entries:
            log.info("evaluating %s on %s (%s split)", entry["path"], data_dir, split)
            entry["evaluated"] = evaluate.run(str(entry["path"]), data_dir, split)
    path = Path(out).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(entries, data_dir, split))
    return path


def _check_fit(entries: list[dict], data_dir: str) -> None:
    from types import SimpleNamespace

    from p5ray import dataset

    items = dataset.read_table(data_dir, "items.parquet")
    users = dataset.read_table(data_dir, "users.parquet")
    for entry in entries:
        ckpt.check_fits_data(SimpleNamespace(path=entry["path"], meta=entry["meta"]), items, users, data_dir)


def render(entries: list[dict], data_dir: str | None, split: str) -> str:
    recorded = [k for k in RECORDED if any(k in e["meta"].get("metrics", {}) for e in entries)]
    evaluated = [k for k in EVALUATED if any(k in e["evaluated"] for e in entries)]
    columns = [("recorded", k) for k in recorded] + [(split, k) for k in evaluated]
    values = [[_value(e, source, key) for source, key in columns] for e in entries]
    best = [_best_index([row[i] for row in values], key) for i, (_, key) in enumerate(columns)]
    head = ["#", "checkpoint", "epoch", "model_version"] + [
        f"{key} ({'valid, recorded' if source == 'recorded' else source})" for source, key in columns
    ]
    lines = [f"# Comparison of {len(entries)} checkpoints", ""]
    if data_dir:
        lines += [f"Evaluated on `{data_dir}` ({split} split, the `p5ray evaluate` protocol); "
                  "recorded columns are the validation numbers saved with each checkpoint.", ""]
    else:
        lines += ["Recorded validation numbers saved with each checkpoint; pass `--data DIR` to also evaluate them.", ""]
    lines += ["| " + " | ".join(head) + " |", "|---:|---|---:|---|" + "---:|" * len(columns)]
    for n, (entry, row) in enumerate(zip(entries, values, strict=True), 1):
        cells = [f"**{fmt_number(v)}**" if best[c] == n - 1 else fmt_number(v) for c, v in enumerate(row)]
        name = f"{entry['meta'].get('run_name') or entry['path'].parent.name}/{entry['path'].name}"
        lines.append("| " + " | ".join([str(n), f"`{name}`", str(entry["meta"].get("epoch", "-")),
                                         str(entry["meta"].get("model_version", "-")), *cells]) + " |")
    baseline = [e["evaluated"].get("baseline/popularity/full/ndcg@10") for e in entries if e["evaluated"]]
    if baseline and finite(baseline[0]):
        lines += ["", f"Popularity baseline on the same split: full/ndcg@10 {fmt_number(baseline[0])}."]
    lines += ["", "Best of each column in bold (highest; lowest for losses and rating errors).", ""]
    lines += _differences(entries)
    lines += ["## Paths", ""] + [f"{n}. `{e['path']}`" for n, e in enumerate(entries, 1)] + [""]
    return "\n".join(lines)


def _value(entry: dict, source: str, key: str):
    value = (entry["meta"].get("metrics", {}) if source == "recorded" else entry["evaluated"]).get(key)
    return float(value) if finite(value) else None


def _best_index(column: list, key: str) -> int | None:
    present = [(v, i) for i, v in enumerate(column) if v is not None]
    if len(present) < 2:
        return None
    lower = any(marker in key for marker in LOWER_IS_BETTER)
    return (min(present) if lower else max(present))[1]


def _differences(entries: list[dict]) -> list[str]:
    flat = [flatten(e["config"]) for e in entries]
    keys = sorted({k for f in flat for k in f})
    differ = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
    if not differ:
        return ["All checkpoints share one config.", ""]
    lines = ["## Config differences", "", "| key | " + " | ".join(f"#{n}" for n in range(1, len(entries) + 1)) + " |",
             "|---|" + "---|" * len(entries)]
    lines += ["| `" + k + "` | " + " | ".join(str(f.get(k, "-")) for f in flat) + " |" for k in differ]
    return lines + [""]
