"""p5ray tune: search-space parsing (pure), leaderboard logic (no Ray), and real sweeps (slow).

The slow tests drive the CLI in subprocesses on MovieLens-100K: the smoke sweep, its best config
retrained by `p5ray train`, and a sweep killed with SIGKILL then finished with --resume.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from p5ray import tune_results
from p5ray.cli import main
from p5ray.config import load_config, to_dict
from p5ray.errors import ConfigError, UserError
from p5ray.tune_space import (
    base_config,
    parse_sweep,
    sample_point,
    simplex_weights,
    swept_values,
    trial_config,
)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tune" / "smoke.yaml"


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory) -> Path:
    from tests.helpers_data import prepare_ml100k

    return prepare_ml100k(tmp_path_factory.mktemp("data") / "ml-100k")


def sweep_of(**extra):
    return parse_sweep({"space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}, **extra})


def draws(sweep, n=200):
    return [sample_point(sweep) for _ in range(n)]


# -- search-space parsing (pure) -------------------------------------------------------------


@pytest.mark.parametrize(
    "key, spec, check",
    [
        ("train.lr", {"uniform": [0.001, 0.002]}, lambda v: 0.001 <= v < 0.002),
        ("train.lr", {"loguniform": [1e-5, 1e-1]}, lambda v: 1e-5 <= v < 1e-1),
        ("model.dropout", {"quniform": [0.1, 0.5, 0.1]}, lambda v: abs(v * 10 - round(v * 10)) < 1e-9),
        ("train.lr", {"qloguniform": [1e-4, 1e-2, 1e-4]}, lambda v: abs(v / 1e-4 - round(v / 1e-4)) < 1e-6),
        ("train.weight_decay", {"normal": [0.01, 0.001]}, lambda v: isinstance(v, float)),
        ("model.dim", {"randint": [8, 12]}, lambda v: isinstance(v, int) and 8 <= v < 12),
        ("model.dim", {"qrandint": [16, 64, 16]}, lambda v: v in (16, 32, 48, 64)),
        ("model.layers", {"lograndint": [1, 4]}, lambda v: isinstance(v, int) and 1 <= v < 4),
        ("model.mixture", {"choice": ["mmoe", "ple"]}, lambda v: v in ("mmoe", "ple")),
        ("model.dim", [32, 64], lambda v: v in (32, 64)),
    ],
)
def test_each_distribution_samples_valid_values(key, spec, check):
    sweep = parse_sweep({"space": {key: spec}})
    base = base_config(sweep)
    for point in draws(sweep, 50):
        assert check(point[key]), point
        cfg = trial_config(base, point, sweep)  # type-checked like any config
        assert swept_values(cfg, sweep)[key] == pytest.approx(point[key])


def test_grid_dimension_becomes_a_tune_grid():
    sweep = parse_sweep({"space": {"model.dim": {"grid": [16, 32]}}})
    (dim,) = sweep.dims
    assert dim.domain() == {"grid_search": [16, 32]}
    assert sample_point(sweep) == {"model.dim": 16}


@pytest.mark.parametrize("tasks, total", [(["recall", "rank", "cross_sell", "rating"], 1.0), (["rank", "cross_sell"], 2.5)])
def test_simplex_weights_sum_to_the_total(tasks, total):
    sweep = parse_sweep({"simplex": {"tasks": tasks, "sum": total}, "base": {"loss": {"alpha": {"recall": 0.7}}}})
    base = base_config(sweep)
    samples = []
    for point in draws(sweep):
        weights = simplex_weights(point, sweep)
        assert set(weights) == set(tasks)
        assert sum(weights.values()) == pytest.approx(total)
        assert all(w > 0 for w in weights.values())
        alpha = to_dict(trial_config(base, point, sweep).loss.alpha)
        assert {t: alpha[t] for t in tasks} == pytest.approx(weights)
        if "recall" not in tasks:
            assert alpha["recall"] == 0.7  # a task off the simplex keeps its base weight
        samples.append([weights[t] for t in tasks])
    # Dirichlet(1,...,1): every weight has mean total/K (loose: 200 draws)
    assert np.mean(samples, axis=0) == pytest.approx([total / len(tasks)] * len(tasks), rel=0.25)


@pytest.mark.parametrize(
    "data, named",
    [
        ({"space": {"train.lrr": {"uniform": [0, 1]}}}, "train.lrr"),
        ({"space": {"nosuch.section": [1, 2]}}, "nosuch.section"),
        ({"base": {"train": {"epochz": 3}}}, "train.epochz"),
        ({"spaces": {}}, "spaces"),
        ({"simplex": ["recall", "ranking"]}, "ranking"),
        ({"metric": "valid/ndcg@100"}, "valid/ndcg@100"),
        ({"objective": {"valid/ndcg@10": 1.0, "test/hr@10": 1.0}}, "test/hr@10"),
        ({"space": {"model.dim": {"uniform": [8, 64]}}}, "model.dim"),
        ({"space": {"model.mixture": ["mmoe", "moe"]}}, "moe"),
        ({"space": {"train.lr": {"loguniform": [0, 1]}}}, "train.lr"),
        ({"space": {"train.lr": {"uniform": [0.1, 0.01]}}}, "train.lr"),
        ({"space": {"train.lr": {"beta": [1, 2]}}}, "beta"),
        ({"space": {"train.lr": 0.01}}, "train.lr"),
        ({"scheduler": {"type": "asha", "grace": 2}}, "grace"),
        ({"scheduler": "hyperband"}, "hyperband"),
        ({"space": {"model.dim": {"grid": [8, 16]}}, "search": "optuna"}, "grid"),
    ],
)
def test_bad_search_spaces_are_rejected_naming_the_key(data, named):
    with pytest.raises(ConfigError) as err:
        parse_sweep(data)
    assert named in err.value.one_line()


def test_objective_replaces_the_metric():
    sweep = sweep_of(objective={"valid/ndcg@10": 1.0, "valid/hr@20": 0.5}, mode="max")
    assert sweep.metric == "objective"
    from p5ray.train import weighted_objective

    assert weighted_objective({"valid/ndcg@10": 0.2, "valid/hr@20": 0.4, "x": 9}, sweep.objective) == pytest.approx(0.4)


def test_config_layers_and_set_conflicts(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train: {epochs: 9, batch_size: 32}\nmodel: {dim: 24}\n")
    sweep = sweep_of(base={"train": {"epochs": 2}}, workers_per_trial=2)
    base = base_config(sweep, str(cfg_file), ["train.batch_size=16"])
    assert (base["train"]["epochs"], base["train"]["batch_size"], base["model"]["dim"]) == (2, 16, 24)
    assert base["train"]["num_workers"] == 2
    with pytest.raises(ConfigError, match="train.lr"):
        base_config(sweep, None, ["train.lr=0.1"])


def test_pbt_checks_what_may_change_mid_run():
    sweep = parse_sweep({"space": {"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.dim": [16, 32]}, "scheduler": "pbt"})
    assert sweep.scheduler["mutations"] == ["train.lr"]  # shapes are copied from the donor, never mutated
    with pytest.raises(ConfigError, match="model.dim"):
        parse_sweep({"space": {"model.dim": [16, 32]}, "scheduler": {"type": "pbt", "mutations": ["model.dim"]}})
    with pytest.raises(ConfigError, match="optuna"):
        parse_sweep({"space": {"train.lr": {"uniform": [0.001, 0.01]}}, "scheduler": "pbt", "search": "optuna"})


@pytest.mark.parametrize("path", sorted((ROOT / "tune").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_search_spaces_parse_and_build_configs(path):
    from p5ray.tune_space import load_sweep

    sweep = load_sweep(path)
    base = base_config(sweep)
    for point in draws(sweep, 20):
        trial_config(base, point, sweep)


def test_smoke_space_is_small():
    from p5ray.tune_space import load_sweep

    sweep = load_sweep(SMOKE)
    assert sweep.num_samples == 2 and sweep.scheduler["type"] == "asha"
    assert base_config(sweep)["train"]["epochs"] == 1


# -- resources (pure) ------------------------------------------------------------------------


def test_concurrency_leaves_cpus_for_ray_data():
    from p5ray.tune import plan_concurrency

    cluster = {"CPU": 8.0, "GPU": 0.0, "node_cpus": 8.0}
    assert plan_concurrency(sweep_of(workers_per_trial=2, num_samples=10), False, cluster) == 3  # (8-1)//2.01
    assert plan_concurrency(sweep_of(num_samples=2), False, cluster) == 2  # never more than trials
    assert plan_concurrency(sweep_of(max_concurrent_trials=50, num_samples=60), False, cluster) == 6
    assert plan_concurrency(sweep_of(workers_per_trial=2, num_samples=8), True, {**cluster, "GPU": 4.0}) == 2


@pytest.mark.parametrize(
    "sweep, cluster, says",
    [
        (dict(workers_per_trial=4, cpus_per_worker=2), {"CPU": 8.0, "GPU": 0.0, "node_cpus": 8.0}, "needs 8 CPUs"),
        (dict(cpus_per_worker=6), {"CPU": 16.0, "GPU": 0.0, "node_cpus": 4.0}, "largest node has 4"),
    ],
)
def test_a_trial_that_cannot_fit_fails_fast(sweep, cluster, says):
    from p5ray.tune import plan_concurrency

    with pytest.raises(UserError, match=says):
        plan_concurrency(sweep_of(**sweep), False, cluster)
    with pytest.raises(UserError, match="GPU"):
        plan_concurrency(sweep_of(workers_per_trial=2), True, {"CPU": 8.0, "GPU": 1.0, "node_cpus": 8.0})


# -- leaderboard from trial directories (no Ray cluster) -------------------------------------


def fake_sweep_dir(tmp_path: Path, sweep, curves: dict[str, list[float]]) -> Path:
    for i, (tid, values) in enumerate(curves.items()):
        d = tmp_path / f"trial_{tid}"
        d.mkdir(parents=True)
        point = {"train.lr": 0.001 * (i + 1)}
        (d / "params.json").write_text(json.dumps(point))
        lines = [
            {"epoch": e, sweep.metric: v, "valid/hr@10": v * 2, "checkpoint_path": f"/ckpt/{tid}/epoch{e}", "config": point}
            for e, v in enumerate(values, 1)
        ]
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return tmp_path


def test_leaderboard_takes_metric_and_checkpoint_from_the_same_epoch(tmp_path):
    from p5ray.tune import TrialSetup

    sweep = sweep_of()
    setup = TrialSetup("/data", base_config(sweep), sweep, "/train")
    fake_sweep_dir(tmp_path, sweep, {"a": [0.01, 0.05, 0.03], "b": [0.02, 0.04], "c": [float("nan")]})
    rows = tune_results.write_outputs(tmp_path, setup)
    assert [r["trial_id"] for r in rows] == ["a", "b", "c"]
    assert (rows[0]["valid/ndcg@10"], rows[0]["best_epoch"], rows[0]["checkpoint"]) == (0.05, 2, "/ckpt/a/epoch2")
    assert rows[0]["epochs_run"] == 3 and rows[1]["epochs_run"] == 2
    assert rows[2]["best_epoch"] is None
    with open(tmp_path / "leaderboard.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and table[0]["checkpoint"] == "/ckpt/a/epoch2" and table[0]["rank"] == "1"
    assert float(table[0]["train.lr"]) == pytest.approx(0.001)
    best = load_config(tmp_path / "best_config.yaml")
    assert best.train.lr == pytest.approx(0.001)
    for png in ("metric_by_epoch.png", "landscape.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    table_text = tune_results.summary_table(rows, sweep.metric)
    assert table_text.splitlines()[0].split()[:2] == ["rank", "trial_id"]
    from p5ray.tune import SETUP_FILE, regenerate_outputs

    (tmp_path / SETUP_FILE).write_text(json.dumps(setup.to_json()))
    (tmp_path / "leaderboard.csv").unlink()
    assert [r["trial_id"] for r in regenerate_outputs(tmp_path)] == ["a", "b", "c"]
    assert (tmp_path / "leaderboard.csv").exists()


def test_leaderboard_mode_min(tmp_path):
    from p5ray.tune import TrialSetup

    sweep = sweep_of(metric="loss/total", mode="min")
    setup = TrialSetup("/data", base_config(sweep), sweep, "/train")
    fake_sweep_dir(tmp_path, sweep, {"a": [3.0, 2.0, 2.5], "b": [1.5, 1.7]})
    rows = tune_results.write_outputs(tmp_path, setup)
    assert [(r["trial_id"], r["best_epoch"]) for r in rows] == [("b", 1), ("a", 2)]


def test_asha_state_survives_a_save_and_restore():
    import pickle

    from ray.tune.schedulers import ASHAScheduler

    class Trial:
        def __init__(self, tid):
            self.trial_id = tid

    def asha():
        return ASHAScheduler(time_attr="epoch", metric="m", mode="max", max_t=8, grace_period=1, reduction_factor=2)

    def rungs(scheduler):
        return [(milestone, dict(recorded)) for b in scheduler._brackets for milestone, recorded in b._rungs]

    first = asha()
    for i in range(4):
        first.on_trial_add(None, Trial(str(i)))
        first.on_trial_result(None, Trial(str(i)), {"epoch": 1, "m": float(i)})
    state = pickle.loads(pickle.dumps(tune_results.SchedulerState(first).get_state()))  # as Tune stores it
    second = asha()
    tune_results.SchedulerState(second).set_state(state)
    assert rungs(second) == rungs(first)
    assert any(recorded for _, recorded in rungs(first))


def test_restored_optimizer_takes_the_new_lr_and_weight_decay():
    import torch

    from p5ray.config import Config, replace
    from p5ray.train import _apply_config_rates, lr_lambda

    def make(cfg):
        params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
        opt = torch.optim.AdamW([{"params": params[:1], "weight_decay": cfg.train.weight_decay}, {"params": params[1:], "weight_decay": 0.0}], lr=cfg.train.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, 2, 10, 0.1))
        return opt, sched

    old = Config()
    opt, sched = make(old)
    for _ in range(5):
        opt.step()
        sched.step()
    new = replace(old, train={"lr": 0.01, "weight_decay": 0.3})
    opt2, sched2 = make(new)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    _apply_config_rates(opt2, sched2, new)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01 * lr_lambda(5, 2, 10, 0.1))
    assert opt2.param_groups[0]["weight_decay"] == 0.3 and opt2.param_groups[1]["weight_decay"] == 0.0
    sched2.step()
    assert opt2.param_groups[1]["lr"] == pytest.approx(0.01 * lr_lambda(6, 2, 10, 0.1))
    same_opt, same_sched = make(old)  # resuming with the same config changes nothing
    same_opt.load_state_dict(opt.state_dict())
    same_sched.load_state_dict(sched.state_dict())
    _apply_config_rates(same_opt, same_sched, old)
    assert same_opt.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


# -- the command line: errors (no Ray) -------------------------------------------------------


def test_cli_bad_search_space_is_one_line_exit_2(ml100k, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  train.lrr: {uniform: [0.1, 0.2]}\n")
    code = main(["tune", "--data", str(ml100k), "--search-space", str(bad), "--storage", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.lrr" in err[0]


def test_cli_resume_of_nothing_is_exit_2(ml100k, tmp_path, capsys):
    code = main(["tune", "--data", str(ml100k), "--search-space", str(SMOKE), "--storage", str(tmp_path), "--name", "none", "--resume"])
    assert code == 2 and "no sweep to continue" in capsys.readouterr().err



def test_cli_resume_with_another_search_space_is_exit_2(ml100k, tmp_path, capsys):
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    (sweep_dir / "tuner.pkl").write_bytes(b"")
    (sweep_dir / "sweep.json").write_text(json.dumps({"data_dir": str(ml100k), "base": {}, "sweep": {}}))
    code = main(["tune", "--data", str(ml100k), "--search-space", str(SMOKE), "--storage", str(tmp_path), "--name", "s", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "differ from those the sweep" in err


def test_cli_existing_sweep_without_resume_is_exit_2(ml100k, tmp_path, capsys):
    (tmp_path / "s").mkdir()
    code = main(["tune", "--data", str(ml100k), "--search-space", str(SMOKE), "--storage", str(tmp_path), "--name", "s"])
    assert code == 2 and "--resume" in capsys.readouterr().err


def test_cli_mlflow_without_mlflow_is_exit_2(ml100k, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    code = main(["tune", "--data", str(ml100k), "--search-space", str(SMOKE), "--storage", str(tmp_path), "--mlflow-uri", "file:///tmp/m"])
    assert code == 2 and "pip install mlflow" in capsys.readouterr().err

# -- real sweeps (slow) ----------------------------------------------------------------------


ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def p5ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p5ray.cli", *args], capture_output=True, text=True, env=ENV, timeout=900)


@pytest.fixture(scope="module")
def resumed_smoke(ml100k, tmp_path_factory) -> dict:
    """tune/smoke.yaml, one trial at a time, SIGKILLed after its first trial, then --resume'd."""
    tmp = tmp_path_factory.mktemp("sweep")
    space_file = tmp / "smoke-serial.yaml"
    space_file.write_text(yaml.safe_dump(yaml.safe_load(SMOKE.read_text()) | {"max_concurrent_trials": 1}))
    sweep_dir = tmp / "runs" / "smoke"
    args = ["tune", "--data", str(ml100k), "--search-space", str(space_file), "--storage", str(tmp / "runs"), "--name", "smoke"]
    log = open(tmp / "killed-driver.log", "w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "p5ray.cli", *args], stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while not finished_trials(sweep_dir) and time.time() < deadline and driver.poll() is None:
            time.sleep(1)
        time.sleep(3)  # the experiment state records the finished trial
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
        log.close()
    before = {d: (sweep_dir / d / "result.json").read_text() for d in finished_trials(sweep_dir)}
    resumed = p5ray(*args, "--resume")
    killed_log = (tmp / "killed-driver.log").read_text()[-3000:]
    return {"before": before, "out": resumed, "dir": sweep_dir, "data": ml100k, "tmp": tmp, "killed_log": killed_log}


def finished_trials(sweep_dir: Path) -> set[str]:
    """Trials with a report in result.json (a 1-epoch trial reports once, at its end)."""
    return {d.name for d in sweep_dir.glob("trial_*") if (d / "result.json").exists() and (d / "result.json").read_text().strip()}


@pytest.mark.slow
def test_killed_sweep_resumes_keeping_finished_trials(resumed_smoke):
    out, sweep_dir = resumed_smoke["out"], resumed_smoke["dir"]
    assert resumed_smoke["before"], f"no trial finished before the kill: {resumed_smoke['killed_log']}"
    assert out.returncode == 0, out.stderr[-3000:]
    for d, text in resumed_smoke["before"].items():  # finished trials were kept, not rerun
        assert (sweep_dir / d / "result.json").read_text() == text
    with open(sweep_dir / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
    assert len(resumed_smoke["before"]) == 1, "the kill came after both trials (the resume had nothing to run)"


@pytest.mark.slow
def test_smoke_sweep_leaderboard_and_best_config_retrains(resumed_smoke):
    out, sweep_dir = resumed_smoke["out"], resumed_smoke["dir"]
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last == f"best_config: {sweep_dir / 'best_config.yaml'}"
    best = Path(last.removeprefix("best_config: "))
    with open(best.parent / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    scores = [float(r["valid/ndcg@10"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    for row in rows:  # the checkpoint is the best epoch's, and says so itself
        meta = json.loads((Path(row["checkpoint"]) / "meta.json").read_text())
        assert meta["epoch"] == int(row["best_epoch"]) == 1
        assert meta["metrics"]["valid/ndcg@10"] == pytest.approx(float(row["valid/ndcg@10"]))
        weights = [float(row[f"loss.alpha.{t}"]) for t in ("recall", "rank", "cross_sell", "rating")]
        assert math.isclose(sum(weights), 1.0, rel_tol=1e-6)
    cfg = load_config(best)
    assert cfg.train.lr == pytest.approx(float(rows[0]["train.lr"]))
    assert yaml.safe_load((Path(rows[0]["checkpoint"]) / "config.yaml").read_text()) == to_dict(cfg)
    for png in ("metric_by_epoch.png", "landscape.png"):
        assert (best.parent / png).stat().st_size > 1000
    tmp = resumed_smoke["tmp"]
    retrain = p5ray("train", "--data", str(resumed_smoke["data"]), "--config", str(best), "--set", "train.epochs=1",
                    "--storage", str(tmp / "again"), "--name", "again")
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    assert retrain.stdout.strip().splitlines()[-1].startswith("checkpoint: ")

def test_optuna_search_is_optional(monkeypatch):
    from p5ray.tune import _searcher

    sweep = sweep_of(search="optuna", seed=3)
    try:
        import optuna  # noqa: F401
    except ImportError:
        pass
    else:
        assert type(_searcher(sweep, 2)).__name__ == "OptunaSearch"
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    with pytest.raises(UserError) as err:
        _searcher(sweep, 2)
    assert "pip install optuna" in err.value.one_line()
    assert type(_searcher(sweep_of(), 2)).__name__ == "BasicVariantGenerator"
