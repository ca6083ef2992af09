"""Ray Train for real: 2 (and 3) DDP workers on CPU, checkpoints, resume, the CLI contract."""

import json
import math
from pathlib import Path

import pytest

from p5ray import checkpoint as ckpt
from p5ray import train
from p5ray.config import load_config
from tests.helpers import TINY, last_line, run_cli

pytestmark = pytest.mark.slow


def test_fit_writes_complete_checkpoints(tiny_checkpoint):
    loaded = ckpt.load(tiny_checkpoint)
    assert loaded.meta["epoch"] in (1, 2)
    assert loaded.config.model.dim == 16
    assert set(loaded.model.spec.tasks) == {"recall", "rank", "cross_sell", "rating"}
    metrics = loaded.meta["metrics"]
    assert 0 <= metrics["valid/ndcg@10"] <= metrics["valid/hr@10"] <= 1
    for key in ("loss/recall", "loss/rank", "loss/cross_sell", "loss/rating"):
        assert math.isfinite(metrics[key]), key
    assert ckpt.load_train_state(tiny_checkpoint)["optimizer"]["state"], "optimizer state missing"
    users = loaded.users.to_pydict()
    assert all(len(h) >= 3 for h in users["history"]), "serving needs every user's history"


def test_uneven_shards_on_three_workers_finish(ml_small_data, tmp_path):
    """150 users do not split evenly over 3 ranks; every rank must take the same number of steps."""
    cfg = load_config(TINY, ["train.epochs=1", "train.num_workers=3", "train.batch_size=7"])
    result = train.fit(str(ml_small_data), cfg, storage=str(tmp_path), name="three")
    assert Path(result.checkpoint).is_dir()


def test_cli_train_prints_checkpoint_last_and_resumes(ml_small_data, tmp_path):
    args = ["train", "--data", str(ml_small_data), "--config", str(TINY), "--num-workers", "2",
            "--storage", str(tmp_path), "--name", "run", "--set", "train.epochs=1"]
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("checkpoint: ")
    first = Path(last_line(out.stdout, "checkpoint: "))
    assert first.is_absolute() and first.is_dir()

    again = run_cli(*args)
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = run_cli(*args[:-1], "train.epochs=2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    meta = json.loads((Path(last_line(resumed.stdout, "checkpoint: ")) / "meta.json").read_text())
    epochs = sorted(p.name for p in (tmp_path / "run").glob("checkpoint_epoch_*"))
    assert "checkpoint_epoch_0002" in epochs, epochs
    assert meta["epoch"] in (1, 2)


def test_cli_evaluate_prints_one_json_object(tiny_checkpoint, ml_small_data, tmp_path):
    out = run_cli("evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(ml_small_data),
                  "--output", str(tmp_path / "m.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads(out.stdout)
    assert metrics == json.loads((tmp_path / "m.json").read_text())
    for key in ("full/ndcg@10", "full_unmasked/hr@10", "sampled/hr@10", "rank/auc", "cross_sell/auc",
                "cross_sell/hr@10", "rating/rmse", "rating/mae", "baseline/popularity/full/ndcg@10"):
        assert math.isfinite(metrics[key]), key
    assert metrics["n_users"] == 150 and "leave-one-out" in metrics["protocol"]
    assert metrics["sampled/hr@10"] >= metrics["full/hr@10"] >= metrics["full/ndcg@10"]
