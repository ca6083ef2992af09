"""Run reports, `p5ray report` and `p5ray report --compare`: files, plots, numbers, errors.

Most tests build a run directory by hand (checkpoint meta.json files, as train writes them) and
need no Ray; the slow ones read the report of a real training run and evaluate real checkpoints.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from p5ray import report
from p5ray.cli import main
from p5ray.compare import compare
from tests.helpers import make_checkpoint

TASK_LOSSES = ("recall", "rank", "cross_sell", "rating")


def epoch_metrics(epoch: int, ndcg: float | None) -> dict:
    """Numbers as rank 0 reports them; ndcg None: an epoch without validation (eval_every)."""
    out = {"epoch": epoch, "loss/total": 10.0 - epoch, "lr": 0.001, "samples_per_s": 1000.0 + epoch, "epoch_time_s": 2.5}
    out.update({f"loss/{t}": 5.0 - 0.5 * epoch + i for i, t in enumerate(TASK_LOSSES)})
    if ndcg is not None:
        out.update({"valid/ndcg@10": ndcg, "valid/hr@10": 2 * ndcg})
    return out


def fake_run(root: Path, ndcgs: list, kept: tuple[int, ...], with_history: bool = True) -> Path:
    """A run directory like train writes: checkpoint_epoch_NNNN/ with meta.json and config.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    history = [epoch_metrics(e, v) for e, v in enumerate(ndcgs, 1)]
    for epoch in kept:
        d = root / f"checkpoint_epoch_{epoch:04d}"
        d.mkdir()
        meta = {"epoch": epoch, "metrics": history[epoch - 1], "tasks": list(TASK_LOSSES), "data_dir": "/data/x"}
        if with_history:
            meta["history"] = history[:epoch]
        (d / "meta.json").write_text(json.dumps(meta))
        (d / "config.yaml").write_text(yaml.safe_dump({"model": {"dim": 16}, "train": {"epochs": 6, "lr": 0.001}}))
    return root


def png_is_a_picture(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:4] == b"\x89PNG"
    assert path.stat().st_size > 10_000, "a near-empty image"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 500
    assert pixels[..., :3].std() > 0.05, "a blank image"
    return pixels


def test_report_files_plots_and_numbers_match_the_run(tmp_path):
    # 5 epochs of 6 configured (early stop); epoch 2 not validated; best epoch 3, not the last
    run = fake_run(tmp_path / "run", [0.01, None, 0.05, 0.04, 0.03], kept=(3, 4, 5))
    path = report.write_run_report(run)
    assert path == run / "report.md"
    png_is_a_picture(run / "loss_by_epoch.png")
    png_is_a_picture(run / "valid_by_epoch.png")
    text = path.read_text()
    assert "**best epoch 3**: valid/ndcg@10 0.0500, valid/hr@10 0.1000" in text
    assert f"best checkpoint: `{run / 'checkpoint_epoch_0003'}`" in text
    assert "epochs run: 5 (stopped early; 6 configured)" in text
    assert "![" in text and "(loss_by_epoch.png)" in text and "(valid_by_epoch.png)" in text
    rows = [ln for ln in text.splitlines() if re.match(r"\| (\*\*)?\d", ln)]
    per_epoch = rows[:5]
    assert [int(r.split("|")[1].strip("* ")) for r in per_epoch] == [1, 2, 3, 4, 5]
    assert per_epoch[2].count("**") >= 2 and "**" not in per_epoch[3], "the best epoch is bold"
    assert "| loss total | loss recall | loss rank | loss cross_sell | loss rating |" in text
    assert per_epoch[1].split("|")[7].strip() == "-", "epoch 2 has no validation"
    assert "0.0400" in per_epoch[3]  # valid/ndcg@10 of epoch 4
    with open(run / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in table] == [1, 2, 3, 4, 5]
    assert float(table[2]["valid/ndcg@10"]) == 0.05 and table[1]["valid/ndcg@10"] == ""
    assert float(table[4]["loss/rank"]) == pytest.approx(epoch_metrics(5, 0)["loss/rank"])


def test_plots_show_the_best_epoch_where_it_is():
    """The validation plot's best-epoch star sits at the best epoch's x (the 3rd of 5 points)."""
    history = report.RunHistory(Path("/run/x"), [epoch_metrics(e, v) for e, v in enumerate([0.01, 0.02, 0.05, 0.04, 0.03], 1)], [])
    assert history.best["epoch"] == 3
    assert report.RunHistory(Path("/r"), [epoch_metrics(1, 0.02), epoch_metrics(2, 0.02)], []).best["epoch"] == 1


def test_report_without_history_falls_back_to_kept_checkpoints(tmp_path):
    run = fake_run(tmp_path / "old", [0.01, 0.02, 0.05], kept=(1, 3), with_history=False)
    history = report.read_history(run)
    assert [e["epoch"] for e in history.epochs] == [1, 3]
    assert history.best["epoch"] == 3
    report.write_run_report(run)
    assert (run / "valid_by_epoch.png").exists()


def test_cli_report_prints_a_summary_and_the_report_path_last(tmp_path, capsys):
    run = fake_run(tmp_path / "run", [0.01, 0.05, 0.04], kept=(2, 3))
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"report: {run / 'report.md'}"
    assert out[-2] == f"best_checkpoint: {run / 'checkpoint_epoch_0002'}"
    summary = json.loads(out[-3])
    assert summary == {"epochs": 3, "best_epoch": 2, "valid/ndcg@10": 0.05, "valid/hr@10": 0.1}
    # a checkpoint directory is taken as its run
    assert main(["report", str(run / "checkpoint_epoch_0003")]) == 0
    assert capsys.readouterr().out.strip().endswith(f"report: {run / 'report.md'}")


def test_cli_report_regenerates_a_sweep(tmp_path, capsys):
    from p5ray.tune import SETUP_FILE, TrialSetup
    from p5ray.tune_space import base_config
    from tests.test_tune import fake_sweep_dir, sweep_of

    sweep = sweep_of()
    setup = TrialSetup("/data", base_config(sweep), sweep, "/train")
    fake_sweep_dir(tmp_path, sweep, {"a": [0.01, 0.05, 0.03], "b": [0.02, 0.04]})
    (tmp_path / SETUP_FILE).write_text(json.dumps(setup.to_json()))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"report: {(tmp_path / 'report.md').resolve()}"
    assert out[-2] == "best_checkpoint: /ckpt/a/epoch2"
    assert json.loads(out[-3]) == {"trials": 2, "finished": 2, "best_trial": "a", "valid/ndcg@10": 0.05}
    assert out[0].split()[:2] == ["rank", "trial_id"]
    for name in ("leaderboard.csv", "best_config.yaml", "metric_by_epoch.png", "landscape.png", "report.md"):
        assert (tmp_path / name).exists(), name


@pytest.mark.parametrize("args, fragment", [
    (["{tmp}/nothing"], "does not exist"),
    (["{tmp}"], "neither a train run"),
    ([], "give RUN_DIR, or --compare"),
    (["{tmp}", "--compare", "{tmp}/a", "{tmp}/b"], "not both"),
    (["--compare", "{tmp}/missing", "{tmp}/missing2"], "does not exist"),
    (["--compare", "{tmp}", "{tmp}"], "not a p5ray checkpoint"),
    (["--compare", "{ckpt}", "{ckpt}", "--data", "{tmp}/nodata"], "--data"),
])
def test_report_errors_are_one_line_exit_2(tmp_path, capsys, args, fragment):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    argv = ["report"] + [a.format(tmp=tmp_path, ckpt=ckpt) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("p5ray report: error: ") and fragment in err[0], err


def test_compare_recorded_metrics_bold_best_and_config_differences(tmp_path, capsys):
    a = make_checkpoint(tmp_path / "runA" / "checkpoint_epoch_0004", seed=1)
    b = make_checkpoint(tmp_path / "runB" / "checkpoint_epoch_0007", seed=2)
    for path, ndcg, lr, epoch in ((a, 0.031, 0.001, 4), (b, 0.042, 0.003, 7)):
        meta = json.loads((path / "meta.json").read_text())
        meta.update(epoch=epoch, metrics={"valid/ndcg@10": ndcg, "valid/hr@10": 2 * ndcg, "loss/total": 9.0 - epoch / 10})
        (path / "meta.json").write_text(json.dumps(meta))
        config = yaml.safe_load((path / "config.yaml").read_text())
        config["train"]["lr"] = lr
        (path / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "cmp" / "table.md"
    assert main(["report", "--compare", str(a), str(b), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out}"
    text = out.read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| 1 ") or ln.startswith("| 2 ")]
    assert "`runA/checkpoint_epoch_0004`" in rows[0] and "| 4 |" in rows[0]
    assert "**0.0420**" in rows[1] and "**" not in rows[0].split("|")[5], "higher ndcg is bold"
    assert "**8.3000**" in rows[1], "lower loss is bold"
    assert "| `train.lr` | 0.001 | 0.003 |" in text
    assert str(a) in text and str(b) in text


def test_compare_with_data_of_another_data_set_is_exit_2(tmp_path, capsys):
    from tests.helpers_cluster import make_prepared

    data = make_prepared(tmp_path / "other-data")
    ckpt = make_checkpoint(tmp_path / "ckpt")
    assert main(["report", "--compare", str(ckpt), "--data", str(data), "--out", str(tmp_path / "c.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "trained on other data" in err and "Traceback" not in err
    assert not (tmp_path / "c.md").exists()


# -- real runs (slow) ---------------------------------------------------------------------------


@pytest.mark.slow
def test_training_writes_the_report_tensorboard_and_history(tiny_checkpoint):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tiny_checkpoint.parent
    history = report.read_history(run)
    meta = json.loads((tiny_checkpoint / "meta.json").read_text())
    assert [e["epoch"] for e in history.epochs] == [1, 2]
    best = history.best
    assert best["valid/ndcg@10"] == pytest.approx(meta["metrics"]["valid/ndcg@10"]) and best["epoch"] == meta["epoch"]
    text = (run / "report.md").read_text()
    assert f"**best epoch {best['epoch']}**: valid/ndcg@10 {best['valid/ndcg@10']:.4f}" in text
    png_is_a_picture(run / "loss_by_epoch.png")
    png_is_a_picture(run / "valid_by_epoch.png")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"loss/total", "loss/recall", "valid/ndcg@10"} <= set(events.Tags()["scalars"])
    ndcg = [(s.step, s.value) for s in events.Scalars("valid/ndcg@10")]
    assert [step for step, _ in ndcg] == [1, 2]
    assert [v for _, v in ndcg] == pytest.approx([e["valid/ndcg@10"] for e in history.epochs], rel=1e-6)


@pytest.mark.slow
def test_compare_evaluates_checkpoints_on_their_data(tiny_checkpoint, ml_small_data, tmp_path):
    from p5ray import evaluate

    first = tiny_checkpoint.parent / "checkpoint_epoch_0001"
    path = compare([str(first), str(tiny_checkpoint)], str(ml_small_data), out=str(tmp_path / "cmp.md"))
    text = path.read_text()
    assert "full/ndcg@10 (test)" in text and "Popularity baseline" in text
    expected = evaluate.run(str(tiny_checkpoint), str(ml_small_data))["full/ndcg@10"]
    row = next(ln for ln in text.splitlines() if ln.startswith("| 2 "))
    assert report.fmt_number(expected) in row


NOISE = ("Reporting training result", "Token authentication", "Progress bars disabled", "PYTHON worker processes",
         "Traceback", "DeprecationWarning", "FutureWarning", "PlacementGroupCleaner", "autoscaler")


@pytest.mark.slow
def test_cli_train_json_logs_one_progress_record_per_epoch_and_tracks_the_run(ml_small_data, tmp_path, monkeypatch):
    """2 workers, --log-format json: every stderr line is JSON, one epoch record per epoch (rank 0
    only), stdout only results; the run's report, TensorBoard files and (if installed) MLflow run."""
    from tests.helpers import TINY, run_cli

    mlflow = None
    try:
        import mlflow
    except ImportError:
        pass
    args = ["train", "--data", str(ml_small_data), "--config", str(TINY), "--num-workers", "2",
            "--storage", str(tmp_path / "runs"), "--name", "j", "--set", "train.epochs=2", "--log-format", "json"]
    if mlflow:
        args += ["--mlflow-uri", f"file:{tmp_path / 'mlruns'}"]
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    stdout = out.stdout.strip().splitlines()
    assert [ln.split(":")[0] for ln in stdout[1:]] == ["run", "report", "checkpoint"], stdout
    assert json.loads(stdout[0])["epoch"] in (1, 2)
    records = [json.loads(ln) for ln in out.stderr.splitlines() if ln.strip()]  # every line is JSON
    epochs = [r for r in records if r.get("event") == "epoch"]
    assert [(r["epoch"], r["epochs"]) for r in epochs] == [(1, 2), (2, 2)]
    assert all("valid/ndcg@10" in r["metrics"] and "samples_per_s" in r["metrics"] for r in epochs)
    for noise in NOISE:
        assert noise not in out.stderr, noise
    run = tmp_path / "runs" / "j"
    checkpoint = Path(stdout[-1].split(": ", 1)[1])
    best = json.loads((checkpoint / "meta.json").read_text())
    text = (run / "report.md").read_text()
    assert f"**best epoch {best['epoch']}**: valid/ndcg@10 {best['metrics']['valid/ndcg@10']:.4f}" in text
    assert [r["metrics"]["valid/ndcg@10"] for r in epochs] == [e["valid/ndcg@10"] for e in report.read_history(run).epochs]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    if mlflow:
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when told
        client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
        (found,) = client.search_runs([client.get_experiment_by_name("p5ray").experiment_id])
        assert found.info.run_name == "j"
        assert [m.step for m in client.get_metric_history(found.info.run_id, "valid/ndcg_at_10")] == [1, 2]
