"""Training under real faults: a killed driver then --resume, a SIGKILLed worker, an exception on
one rank, and checkpoints that were tampered with or belong to other data.

The fault runs are `p5ray train` processes joined to this session's Ray (no Ray start each) with
a test-only hook (p5ray/faults.py). Their reference is the session's `tiny_checkpoint` run: the
same data, config (tiny, 2 epochs, 2 workers) and seed, never interrupted. Every epoch's
randomness derives from (seed, epoch, rank), so a run restarted at an epoch boundary replays the
reference: the final weights must agree to TOLERANCE (measured: bit-identical, difference 0.0).
"""

import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from p5ray import checkpoint as ckpt
from p5ray import faults, train
from p5ray.errors import CheckpointError
from tests.helpers import TINY, last_line, make_checkpoint
from tests.helpers_faults import (
    cli_process,
    finish,
    fired,
    kill,
    main_in_process,
    max_weight_diff,
    wait_for_file,
)

TOLERANCE = 1e-6  # largest weight / metric difference allowed between a recovered run and the reference


def train_args(data: Path, storage: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--config", str(TINY), "--set", "train.epochs=2",
            "--storage", str(storage), "--name", name, *extra]


def reference_epoch(tiny_checkpoint: Path, epoch: int) -> Path:
    return tiny_checkpoint.parent / f"checkpoint_epoch_{epoch:04d}"


# -- pure: the hooks are inert, the failure line names the rank ------------------------------------


def test_fault_hooks_are_inert_unless_asked(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.spec_from_env() is None
    rows = {"items": [[1, 2, 3]]}
    faults.corrupt_shard(None, 1, rows, 10)
    faults.watch_steps(None, 1, None, None, 5)  # would fail on the None optimizer if it did anything
    faults.stall_point("Recall")
    assert rows == {"items": [[1, 2, 3]]}
    spec = faults.spec_from_env({faults.ENV: "pause rank=1 epoch=2 step=3", faults.ENV_DIR: "/d"})
    assert spec == {"kind": "pause", "dir": "/d", "rank": 1, "epoch": 2, "step": 3}


def test_failure_line_names_the_rank_and_the_original_error():
    from ray.train import WorkerGroupError

    error = WorkerGroupError("rank 1 failed", {1: IndexError("index out of range in self")})
    wrapped = RuntimeError("fit failed")
    wrapped.__cause__ = error
    assert train.failure_line(wrapped) == "rank 1: IndexError: index out of range in self"
    both = WorkerGroupError("x", {1: IndexError("bad index"), 0: RuntimeError("peer closed\nConnection reset")})
    assert train.failure_line(both) == "rank 0: RuntimeError: Connection reset (also failed: rank 1)"
    assert train.failure_line(ValueError("plain")) == "ValueError: plain"


def _checkpoint_of_epoch(run_dir: Path, epoch: int, train_state: bool = True) -> Path:
    path = make_checkpoint(run_dir / f"checkpoint_epoch_{epoch:04d}")
    meta = json.loads((path / "meta.json").read_text())
    meta["epoch"] = epoch
    if train_state:
        torch.save({"epoch": epoch}, path / "train_state.pt")
        meta["sha256"]["train_state.pt"] = ckpt._sha256(path / "train_state.pt")
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_a_restart_takes_the_newest_complete_checkpoint_ray_had_not_registered(tmp_path):
    from ray.train import Checkpoint

    one, two = _checkpoint_of_epoch(tmp_path, 1), _checkpoint_of_epoch(tmp_path, 2)
    assert train.newer_checkpoint_on_disk(str(tmp_path), None) == str(two)
    assert train.newer_checkpoint_on_disk(str(tmp_path), Checkpoint(str(one))) == str(two)
    assert train.newer_checkpoint_on_disk(str(tmp_path), Checkpoint(str(two))) is None
    assert train.newer_checkpoint_on_disk(None, None) is None
    (two / "model.pt").write_bytes((two / "model.pt").read_bytes()[:100])  # a copy cut short
    assert train.newer_checkpoint_on_disk(str(tmp_path), None) == str(one)
    _checkpoint_of_epoch(tmp_path, 3, train_state=False)  # weights only: nothing to resume from
    assert train.newer_checkpoint_on_disk(str(tmp_path), None) == str(one)


# -- an exception on one rank --------------------------------------------------------------------------


@pytest.mark.slow
def test_exception_on_one_rank_fails_the_run_at_once_without_retries(ml_small_data, tmp_path):
    """An out-of-range item index in rank 1's shard, with train.max_failures=0: exit 1 with the
    original IndexError and the rank on one line, no `checkpoint:` line, no retry, rank 0 (waiting
    in DDP's all-reduce) torn down rather than hanging."""
    faults_dir = tmp_path / "faults"
    faults_dir.mkdir()
    started = time.monotonic()
    run = cli_process(*train_args(ml_small_data, tmp_path, "bad", "--set", "train.max_failures=0"),
                      fault="bad_index rank=1", fault_dir=faults_dir)
    code, out, err = finish(run, timeout=400)
    elapsed = time.monotonic() - started
    print(f"\none-rank exception: exit {code} after {elapsed:.1f} s")
    assert code == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("p5ray train: error:")]
    assert len(errors) == 1, err[-3000:]  # one line (Ray may still echo worker logs around it)
    assert errors[0].startswith("p5ray train: error: training failed: rank 1: IndexError"), errors[0]
    assert "checkpoint:" not in out
    assert len(fired(faults_dir)) == 1  # max_failures=0: no second attempt
    assert not list((tmp_path / "bad").glob("checkpoint_epoch_*"))


# -- the driver killed, --resume, then a worker killed -----------------------------------------------


@pytest.mark.slow
def test_killed_driver_then_killed_worker_the_run_ends_on_the_reference_weights(ml_small_data, tiny_checkpoint, tmp_path):
    """1. SIGKILL the driver while rank 0 is at epoch 2, step 1; `p5ray train --resume` continues
    from checkpoint_epoch_0001. 2. In that resumed run, SIGKILL rank 1 at epoch 2, step 3: Ray
    Train restarts the workers (train.max_failures = 2 by default), again from epoch 1's
    checkpoint. The run ends with the weights of the uninterrupted reference."""
    faults_dir = tmp_path / "faults"
    faults_dir.mkdir()
    args = train_args(ml_small_data, tmp_path, "run")
    run_dir = tmp_path / "run"
    epoch1, epoch2 = run_dir / "checkpoint_epoch_0001", run_dir / "checkpoint_epoch_0002"

    driver = cli_process(*args, fault="pause rank=0 epoch=2 step=1", fault_dir=faults_dir)
    wait_for_file(faults_dir / "pause-rank-0.pid", driver)
    driver_killed = kill(driver.pid)  # the driver itself: Ray ends its job, controller and workers
    driver.communicate()
    assert epoch1.is_dir() and not epoch2.exists()

    resumed = cli_process(*args, "--resume", fault="pause rank=1 epoch=2 step=3", fault_dir=faults_dir)
    worker_killed = kill(int(wait_for_file(faults_dir / "pause-rank-1.pid", resumed)))
    resumed_s = worker_killed - driver_killed  # from the driver's death to the resumed run at epoch 2
    code, out, err = finish(resumed)
    assert code == 0, err[-3000:]

    # both restarts continued at epoch 2 from the checkpoint written before the driver died
    assert err.count(f"resuming from {epoch1} at epoch 1") == 2, err[-3000:]
    assert (epoch1 / "meta.json").stat().st_mtime < driver_killed
    assert worker_killed < (epoch2 / "meta.json").stat().st_mtime
    assert len(fired(faults_dir)) == 2  # each pause once: the restarted workers ran on untouched
    assert Path(last_line(out, "checkpoint: ")).parent == run_dir
    reference = reference_epoch(tiny_checkpoint, 2)
    diff = max_weight_diff(epoch2, reference)
    ours, theirs = (json.loads((p / "meta.json").read_text())["metrics"]["valid/ndcg@10"] for p in (epoch2, reference))
    print(f"\ndriver kill -> --resume: back at epoch 2, step 3 {resumed_s:.1f} s after the driver kill; worker kill -> "
          f"epoch 2 checkpoint {(epoch2 / 'meta.json').stat().st_mtime - worker_killed:.1f} s after it; "
          f"max weight diff {diff:.3g}; valid/ndcg@10 {ours:.6f} vs {theirs:.6f}")
    assert diff <= TOLERANCE and abs(ours - theirs) <= TOLERANCE


# -- checkpoints refused at the command line -----------------------------------------------------------


def one_line_exit_2(argv: list[str], capsys, *fragments: str) -> str:
    assert main_in_process(argv) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def tampered(tiny_checkpoint, tmp_path):
    """A copy of the trained checkpoint; tests damage it."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    ("truncate model.pt", "model.pt does not match its recorded checksum"),
    ("flip a byte of items.parquet", "items.parquet does not match"),
    ("delete users.parquet", "users.parquet is missing"),
    ("truncate meta.json", "meta.json is truncated or not JSON"),
])
@pytest.mark.parametrize("verb", ["evaluate", "serve"])
def test_damaged_checkpoint_is_refused_with_one_line(tampered, ml_small_data, capsys, verb, damage, message):
    file = tampered / damage.split()[-1]
    data = file.read_bytes()
    if damage.startswith("truncate"):
        file.write_bytes(data[: len(data) // 2])
    elif damage.startswith("flip"):
        file.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        file.unlink()
    argv = [verb, "--checkpoint", str(tampered)]
    argv += ["--data", str(ml_small_data)] if verb == "evaluate" else ["--http-port", "1", "--grpc-port", "2"]
    one_line_exit_2(argv, capsys, f"p5ray {verb}: error:", message)


@pytest.fixture
def other_data(ml_small_data, tmp_path):
    """The prepared data with one item renamed: another id vocabulary."""
    other = Path(shutil.copytree(ml_small_data, tmp_path / "other"))
    items = pq.read_table(other / "items.parquet")
    ids = items.column("item_id").to_pylist()
    ids[0] = "not-an-item-of-the-run"
    pq.write_table(items.set_column(items.column_names.index("item_id"), "item_id", pa.array(ids)), other / "items.parquet")
    return other


@pytest.mark.slow
def test_checkpoint_on_other_data_is_refused(tiny_checkpoint, other_data, capsys):
    one_line_exit_2(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(other_data)], capsys,
                    "trained on other data", "evaluate with the data directory")
    run_dir = tiny_checkpoint.parent
    one_line_exit_2(["train", "--data", str(other_data), "--config", str(TINY), "--storage", str(run_dir.parent),
                     "--name", run_dir.name, "--resume"], capsys, "--resume", "other data", "--init-from")


@pytest.mark.slow
def test_resume_state_is_verified_before_it_is_loaded(tampered):
    weights, state = ckpt.load_for_resume(tampered)
    assert state["epoch"] >= 1 and weights
    state_file = tampered / "train_state.pt"
    state_file.write_bytes(state_file.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="train_state.pt does not match"):
        ckpt.load_for_resume(tampered)
