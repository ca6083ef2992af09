"""What a sweep leaves beside it: leaderboard.csv, best_config.yaml, plots, report.md.

Everything is read back from the Tune trial directories (`trial_<id>/result.json`), so the
outputs can be regenerated from a sweep directory alone, with no Ray cluster. Also the two Tune callbacks
of a sweep: progress lines on stderr, and the ASHA scheduler's state for --resume.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import pickle
from pathlib import Path
from typing import Any

from ray.tune import Callback

from p5ray.config import to_dict

log = logging.getLogger("p5ray.tune")
HEAD = ("rank", "trial_id", "status", "best_epoch", "epochs_run")
ALSO = ("valid/ndcg@10", "valid/hr@10")  # shown next to the sweep metric when it is another one


# -- reading trials back ---------------------------------------------------------------------


def read_trials(sweep_dir: str | Path, statuses: dict[str, str] | None = None) -> list[dict]:
    """Every trial_<id>/ of a sweep: its id, status, reports (one dict per epoch) and first config.

    `statuses` (trial id -> Tune status) comes from the experiment state when Ray is at hand.
    """
    trials = []
    for d in sorted(Path(sweep_dir).glob("trial_*")):
        results_file = d / "result.json"
        reports = [json.loads(line) for line in results_file.read_text().splitlines() if line.strip()] if results_file.exists() else []
        params = json.loads((d / "params.json").read_text()) if (d / "params.json").exists() else {}
        error = (d / "error.txt").read_text().strip().splitlines() if (d / "error.txt").exists() else []
        trial_id = d.name.removeprefix("trial_")
        status = (statuses or {}).get(trial_id) or ("ERROR" if error else "TERMINATED" if reports else "NO_RESULTS")
        trials.append({
            "trial_id": trial_id, "status": status, "reports": reports,
            "config": params, "error": error[-1] if error else "",
        })
    return trials


def best_report(reports: list[dict], metric: str, mode: str) -> dict | None:
    """The epoch report with the best metric (the first of equals); its checkpoint comes with it."""
    scored = [r for r in reports if _finite(r.get(metric))]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda r: (sign * r[metric], -r.get("epoch", 0)))


def leaderboard(trials: list[dict], setup) -> list[dict]:
    """One row per trial, best first: metric, epoch and checkpoint of the best epoch, swept values."""
    sweep = setup.sweep
    rows = []
    for trial in trials:
        best = best_report(trial["reports"], sweep.metric, sweep.mode)
        point = (best or {}).get("config") or trial["config"]  # PBT: the config at the best epoch
        row = {
            "trial_id": trial["trial_id"], "status": trial["status"],
            "best_epoch": best.get("epoch") if best else None,
            "epochs_run": max((r.get("epoch", 0) for r in trial["reports"]), default=0),
            sweep.metric: best.get(sweep.metric) if best else None,
        }
        for key in ALSO:
            row.setdefault(key, best.get(key) if best else None)
        if point:
            row.update(_swept(setup, point))
        row["checkpoint"] = best.get("checkpoint_path") if best else None
        row["time_s"] = round(max((r.get("time_total_s", 0.0) for r in trial["reports"]), default=0.0), 1)
        row["error"] = trial["error"]
        row["_point"] = point
        row["_curve"] = [(r["epoch"], r[sweep.metric]) for r in trial["reports"] if _finite(r.get(sweep.metric))]
        rows.append(row)
    sign = 1.0 if sweep.mode == "max" else -1.0
    rows.sort(key=lambda r: (not _finite(r[sweep.metric]), -sign * (r[sweep.metric] or 0.0)))
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def _swept(setup, point: dict) -> dict:
    from p5ray.tune_space import swept_values

    try:
        return swept_values(setup.config(point), setup.sweep)
    except Exception:  # a point from an older space: show it as sampled
        return dict(point)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# -- writing ---------------------------------------------------------------------------------


def write_outputs(sweep_dir: str | Path, setup, statuses: dict[str, str] | None = None) -> list[dict]:
    """leaderboard.csv, best_config.yaml, metric_by_epoch.png, landscape.png and report.md."""
    sweep_dir = Path(sweep_dir)
    rows = leaderboard(read_trials(sweep_dir, statuses), setup)
    write_csv(rows, sweep_dir / "leaderboard.csv")
    best = rows[0] if rows and rows[0]["_point"] and _finite(rows[0][setup.sweep.metric]) else None
    if best:
        write_best_config(setup, best, sweep_dir / "best_config.yaml")
    if rows:
        plot_curves(rows, setup.sweep.metric, sweep_dir / "metric_by_epoch.png")
        plot_landscape(rows, setup.sweep, sweep_dir / "landscape.png")
        write_report(rows, setup.sweep, sweep_dir / "report.md")
    return rows


def public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def write_csv(rows: list[dict], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in public(row) if k not in columns]
    columns = list(HEAD) + [c for c in columns if c not in HEAD]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in public(row).items()})


def write_best_config(setup, best: dict, path: Path) -> None:
    import yaml

    cfg = setup.config(best["_point"])
    metric = setup.sweep.metric
    header = (
        f"# best trial {best['trial_id']} of the sweep in {path.parent}: {metric} = {best[metric]:.6f} "
        f"at epoch {best['best_epoch']}\n# its checkpoint: {best['checkpoint']}\n"
        "# retrain with: p5ray train --data DIR --config THIS_FILE\n"
    )
    path.write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def summary_table(rows: list[dict], metric: str, top: int = 10) -> str:
    """Fixed-width table of the best `top` trials (all columns but the long paths)."""
    skip = {"checkpoint", "error", "time_s"}
    shown = [{k: v for k, v in public(r).items() if k not in skip} for r in rows[:top]]
    if not shown:
        return "no trials"
    columns = list(dict.fromkeys([*HEAD, *(k for r in shown for k in r)]))
    cells = [[_fmt(r.get(c)) for c in columns] for r in shown]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    if len(rows) > top:
        lines.append(f"... {len(rows) - top} more in leaderboard.csv")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(rows: list[dict], sweep, path: Path) -> None:
    done = sum(r["status"] == "TERMINATED" for r in rows)
    text = [
        f"# Sweep {path.parent.name}",
        "",
        f"{len(rows)} trials ({done} finished), metric `{sweep.metric}` ({sweep.mode}), "
        f"scheduler {sweep.scheduler['type']}, search {sweep.search['type']}.",
        "",
        "```",
        summary_table(rows, sweep.metric, top=len(rows)),
        "```",
        "",
        "![metric per epoch](metric_by_epoch.png)",
        "",
        "![landscape](landscape.png)",
        "",
    ]
    path.write_text("\n".join(text))


def plot_curves(rows: list[dict], metric: str, path: Path) -> None:
    """Metric per epoch, one line per trial (a short line: stopped early); dots mark best epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if not row["_curve"]:
            continue
        epochs, values = zip(*row["_curve"], strict=True)
        (line,) = ax.plot(epochs, values, marker=".", label=f"#{row['rank']} {row['trial_id']}")
        ax.plot([row["best_epoch"]], [row[metric]], "o", color=line.get_color(), markersize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (a short line: stopped early)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch, {len(rows)} trials")
    ax.grid(alpha=0.3)
    if 0 < len(ax.get_lines()) <= 24:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_landscape(rows: list[dict], sweep, path: Path) -> None:
    """Best metric of each trial against each swept value (lr, task weights, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in public(rows[0]) if "." in k] if rows else []
    scored = [r for r in rows if _finite(r[sweep.metric])]
    if not keys or not scored:
        return
    log_keys = {d.key for d in sweep.dims if d.log_scale}
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        values = [r.get(key) for r in scored]
        numeric = all(_finite(v) for v in values)
        labels = sorted({str(v) for v in values})
        xs = values if numeric else [labels.index(str(v)) for v in values]
        ax.scatter(xs, [r[sweep.metric] for r in scored], c=range(len(scored)), cmap="viridis_r", s=30)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        if key in log_keys and numeric:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(sweep.metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"best {sweep.metric} of each trial against its swept values (yellow: best trial)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- Tune callbacks --------------------------------------------------------------------------


class ProgressCallback(Callback):
    """One log line (stderr; --quiet hides it) per trial event and validated epoch."""

    def __init__(self, metric: str, mode: str, total: int):
        self.metric, self.mode, self.total = metric, mode, total
        self.done: set[str] = set()
        self.running: set[str] = set()

    def _say(self, text: str) -> None:
        log.info("%s (%d/%d done, %d running)", text, len(self.done), self.total, len(self.running))

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._say(f"trial {trial.trial_id} started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.metric in result:
            self._say(f"trial {trial.trial_id} epoch {result.get('epoch')}: {self.metric} {result[self.metric]:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "failed")

    def _finish(self, trial, what: str) -> None:
        self.running.discard(trial.trial_id)
        self.done.add(trial.trial_id)
        result = trial.last_result or {}
        epoch = result.get("epoch")
        self._say(f"trial {trial.trial_id} {what}" + (f" after epoch {epoch}" if epoch else ""))

    def get_state(self) -> dict:
        return {"done": set(self.done)}

    def set_state(self, state: dict) -> None:
        self.done = set(state.get("done", ()))


class SchedulerState(Callback):
    """Saves the ASHA scheduler's rungs with the experiment state, so --resume keeps them.

    Tune checkpoints searcher and callback state but not the scheduler's; this callback and the
    scheduler are pickled together in tuner.pkl, so on restore it updates that same object.
    """

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def get_state(self) -> dict:
        return {"scheduler": pickle.dumps(self.scheduler.__dict__)}

    def set_state(self, state: dict) -> None:
        self.scheduler.__dict__.update(pickle.loads(state["scheduler"]))
