"""The run report: RUN_DIR/report.md, its plots and metrics.csv, from the run directory alone.

    write_run_report(run_dir)   a `p5ray train` run: loss per task and validation per epoch
    run(path)                   `p5ray report PATH`: a train run, or a sweep (tune_results' outputs)

A train run's per-epoch numbers come from its checkpoints' meta.json: rank 0 saves the history of
every epoch so far in each checkpoint (p5ray/tracking.py), and Ray Train always keeps the latest
checkpoint. Runs from before that history existed fall back to the kept checkpoints' own metrics.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from p5ray.errors import UserError

SCORE = "valid/ndcg@10"
ALSO = "valid/hr@10"
LOSS_PNG, VALID_PNG, REPORT_MD, METRICS_CSV = "loss_by_epoch.png", "valid_by_epoch.png", "report.md", "metrics.csv"


@dataclass
class RunHistory:
    run_dir: Path
    epochs: list[dict]  # one dict of numbers per epoch, ascending
    checkpoints: list[tuple[Path, dict]]  # kept checkpoints and their meta.json, ascending by epoch
    config: dict = field(default_factory=dict)

    @property
    def validated(self) -> list[dict]:
        return [e for e in self.epochs if finite(e.get(SCORE))]

    @property
    def best(self) -> dict | None:
        """The epoch with the highest valid/ndcg@10 (the earliest of equals), as training picks it."""
        scored = self.validated
        return max(scored, key=lambda e: (e[SCORE], -e["epoch"])) if scored else None

    def checkpoint_of(self, epoch: int) -> Path | None:
        return next((p for p, meta in self.checkpoints if meta.get("epoch") == epoch), None)

    @property
    def loss_keys(self) -> list[str]:
        """loss/total first, then the tasks in the registry's order."""
        from p5ray.tasks import TASK_NAMES

        order = ("total", *TASK_NAMES)
        keys = {k for e in self.epochs for k in e if k.startswith("loss/")}
        return sorted(keys, key=lambda k: (order.index(k[5:]) if k[5:] in order else len(order), k))


def finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_history(run_dir: str | Path) -> RunHistory:
    import yaml

    run_dir = Path(run_dir)
    checkpoints = []
    for d in sorted(run_dir.glob("checkpoint_epoch_*")):
        meta_file = d / "meta.json"
        if meta_file.is_file():
            checkpoints.append((d.resolve(), json.loads(meta_file.read_text())))
    if not checkpoints:
        raise UserError(f"{run_dir} holds no checkpoints (checkpoint_epoch_*/meta.json)",
                        "pass the run directory printed as `run: PATH` by `p5ray train`")
    checkpoints.sort(key=lambda cm: cm[1].get("epoch", 0))
    latest_path, latest = checkpoints[-1]
    by_epoch = {int(m["epoch"]): {**m.get("metrics", {}), "epoch": int(m["epoch"])} for _, m in checkpoints}
    for entry in latest.get("history", []):  # the full history, when the run recorded it
        by_epoch[int(entry["epoch"])] = {**entry, "epoch": int(entry["epoch"])}
    config_file = latest_path / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    return RunHistory(run_dir.resolve(), [by_epoch[k] for k in sorted(by_epoch)], checkpoints, config or {})


# -- writing ---------------------------------------------------------------------------------


def write_run_report(run_dir: str | Path) -> Path:
    """report.md, loss_by_epoch.png, valid_by_epoch.png and metrics.csv in the run directory."""
    history = read_history(run_dir)
    write_metrics_csv(history, history.run_dir / METRICS_CSV)
    plot_losses(history, history.run_dir / LOSS_PNG)
    plot_validation(history, history.run_dir / VALID_PNG)
    path = history.run_dir / REPORT_MD
    path.write_text(render_markdown(history))
    return path


def write_metrics_csv(history: RunHistory, path: Path) -> None:
    columns = list(dict.fromkeys(k for e in history.epochs for k in e))
    columns = ["epoch"] + [c for c in columns if c != "epoch"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for entry in history.epochs:
            writer.writerow({k: entry.get(k, "") for k in columns})


def _config_line(config: dict) -> str:
    keys = [("model", "dim"), ("model", "layers"), ("model", "max_len"), ("model", "mixture"), ("train", "lr"),
            ("train", "batch_size"), ("train", "epochs"), ("train", "num_workers"), ("loss", "weighting")]
    parts = [f"`{s}.{k}={config[s][k]}`" for s, k in keys if k in config.get(s, {})]
    alpha = config.get("loss", {}).get("alpha", {})
    parts += [f"`loss.alpha.{t}={w}`" for t, w in alpha.items()]
    return ", ".join(parts)


def render_markdown(history: RunHistory) -> str:
    best = history.best
    latest_meta = history.checkpoints[-1][1]
    configured = history.config.get("train", {}).get("epochs")
    ran = history.epochs[-1]["epoch"] if history.epochs else 0
    lines = [f"# Training run {history.run_dir.name}", "", f"- run directory: `{history.run_dir}`"]
    if latest_meta.get("data_dir"):
        lines.append(f"- data: `{latest_meta['data_dir']}`")
    lines.append(f"- tasks: {', '.join(latest_meta.get('tasks', []))}")
    stopped = f" (stopped early; {configured} configured)" if configured and ran < configured else ""
    lines.append(f"- epochs run: {ran}{stopped}")
    if best:
        ckpt = history.checkpoint_of(best["epoch"])
        also = f", {ALSO} {best[ALSO]:.4f}" if finite(best.get(ALSO)) else ""
        lines.append(f"- **best epoch {best['epoch']}**: {SCORE} {best[SCORE]:.4f}{also}")
        if ckpt:
            lines.append(f"- best checkpoint: `{ckpt}`")
    if history.config:
        lines.append(f"- config: {_config_line(history.config)}")
    lines += ["", "## Validation", "", f"![{SCORE} and {ALSO} per epoch]({VALID_PNG})", "",
              "## Training loss per task", "", f"![loss per task per epoch]({LOSS_PNG})", "",
              "## Per epoch", "", *epoch_table(history), "", f"All reported numbers: [{METRICS_CSV}]({METRICS_CSV}).", ""]
    lines += ["## Checkpoints kept", "", "| checkpoint | epoch | valid/ndcg@10 | valid/hr@10 |", "|---|---:|---:|---:|"]
    for path, meta in history.checkpoints:
        m = meta.get("metrics", {})
        lines.append(f"| `{path.name}` | {meta.get('epoch')} | {fmt_number(m.get(SCORE))} | {fmt_number(m.get(ALSO))} |")
    target = history.checkpoint_of(best["epoch"]) if best else None
    if target:
        data = latest_meta.get("data_dir") or "DATA_DIR"
        lines += ["", "## Next", "", "```bash", f"p5ray evaluate --checkpoint {target} --data {data}",
                  f"p5ray serve --checkpoint {target}", "```"]
    return "\n".join(lines) + "\n"


def epoch_table(history: RunHistory) -> list[str]:
    """Markdown rows: epoch, each loss, validation metrics, throughput; the best epoch in bold."""
    losses = history.loss_keys
    extra = [k for k in (SCORE, ALSO, "lr", "samples_per_s", "epoch_time_s") if any(k in e for e in history.epochs)]
    names = {"samples_per_s": "samples/s", "epoch_time_s": "epoch s"}
    head = ["epoch"] + [k.replace("loss/", "loss ") for k in losses] + [names.get(k, k) for k in extra]
    rows = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    best_epoch = history.best["epoch"] if history.best else None
    for e in history.epochs:
        cells = [str(e["epoch"])] + [fmt_number(e.get(k)) for k in losses + extra]
        if e["epoch"] == best_epoch:
            cells = [f"**{c}**" for c in cells]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def fmt_number(value) -> str:
    if not finite(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.4g}" if abs(value) < 0.01 else f"{value:.4f}"


# -- plots -------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(history: RunHistory, path: Path) -> None:
    """One panel per loss (total first): each task's loss has its own scale; dashed: best epoch."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    keys = history.loss_keys or ["loss/total"]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    best = history.best
    for ax, key in zip(axes.flat, keys, strict=False):
        points = [(e["epoch"], e[key]) for e in history.epochs if finite(e.get(key))]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, color="tab:blue" if key == "loss/total" else "tab:orange")
        if best:
            ax.axvline(best["epoch"], color="tab:green", linestyle="--", linewidth=1)
        ax.set_title(key.replace("loss/", "") + (" (weighted sum)" if key == "loss/total" else ""))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)  # plain values, no "+1.386" offset
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    note = f"; dashed: best epoch {best['epoch']} by {SCORE}" if best else ""
    fig.suptitle(f"training loss per task, run {history.run_dir.name}{note}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_validation(history: RunHistory, path: Path) -> None:
    """valid/ndcg@10 and valid/hr@10 per validated epoch; the best epoch marked and labelled."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, color in ((SCORE, "tab:blue"), (ALSO, "tab:purple")):
        points = [(e["epoch"], e[key]) for e in history.epochs if finite(e.get(key))]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=4, color=color, label=key)
    best = history.best
    if best:
        ax.axvline(best["epoch"], color="tab:green", linestyle="--", linewidth=1)
        ax.plot([best["epoch"]], [best[SCORE]], marker="*", markersize=16, color="tab:green",
                label=f"best epoch {best['epoch']}: {SCORE} {best[SCORE]:.4f}", linestyle="none")
        if finite(best.get(ALSO)):
            ax.plot([best["epoch"]], [best[ALSO]], marker="*", markersize=12, color="tab:green", linestyle="none")
    gaps = len(history.validated) < len(history.epochs)
    ax.set_xlabel("epoch" + (" (points: validated epochs)" if gaps else ""))
    ax.set_ylabel("validation metric")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"validation per epoch, run {history.run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- `p5ray report PATH` -------------------------------------------------------------------------


@dataclass
class Summary:
    kind: str  # "train" or "sweep"
    report: Path
    numbers: dict  # printed as one JSON line
    best_checkpoint: str | None
    table: str | None = None  # a sweep's leaderboard, as `p5ray tune` prints it


def run(path: str | Path) -> Summary:
    """Regenerate the report of a train run or a sweep directory; return what to print."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist", "pass STORAGE/NAME of a run (`run: PATH` from `p5ray train`) or a sweep")
    if (path / "meta.json").is_file() and path.name.startswith("checkpoint_"):
        path = path.parent  # a checkpoint: report its run
    if (path / "sweep.json").is_file():
        return _sweep(path)
    if not any(path.glob("checkpoint_epoch_*")):
        raise UserError(f"{path} is neither a train run (checkpoint_epoch_*) nor a sweep (sweep.json)",
                        "pass STORAGE/NAME as printed by `p5ray train` (run: ...) or `p5ray tune`")
    report = write_run_report(path)
    history = read_history(path)
    best = history.best or {}
    numbers = {"epochs": len(history.epochs), "best_epoch": best.get("epoch")}
    numbers.update({k: best[k] for k in (SCORE, ALSO) if k in best})
    target = history.checkpoint_of(best["epoch"]) if best else None
    return Summary("train", report.resolve(), numbers, str(target) if target else None)


def _sweep(path: Path) -> Summary:
    from p5ray.tune import load_setup, regenerate_outputs
    from p5ray.tune_results import summary_table

    rows = regenerate_outputs(path)
    metric = load_setup(path).sweep.metric
    best = rows[0] if rows else {}
    numbers = {"trials": len(rows), "finished": sum(r["status"] == "TERMINATED" for r in rows),
               "best_trial": best.get("trial_id"), metric: best.get(metric)}
    return Summary("sweep", (path / REPORT_MD).resolve(), numbers, best.get("checkpoint"), summary_table(rows, metric))
