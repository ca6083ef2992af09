"""Training progress (driver side) and rank 0's RunTracker (history, TensorBoard, MLflow), no Ray."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from p5ray import logs
from p5ray.progress import ProgressPrinter, _latest_steps, epoch_line, step_line
from p5ray.tracking import RunTracker, mlflow_key, require_mlflow

METRICS = {
    "epoch": 3, "loss/total": 9.1234, "loss/recall": 7.0, "loss/rank": 1.25, "lr": 0.001,
    "valid/ndcg@10": 0.0421, "valid/hr@10": 0.0833, "best/valid/ndcg@10": 0.0421,
    "samples_per_s": 2210.4, "epoch_time_s": 9.8,
}


class ListQueue:
    """Stands in for the Ray queue: put_nowait / get(timeout) / qsize / get_nowait_batch."""

    def __init__(self):
        self.items = []

    def put_nowait(self, item):
        self.items.append(item)

    def qsize(self):
        return len(self.items)

    def get(self, timeout=None):
        from ray.util.queue import Empty

        if not self.items:
            raise Empty
        return self.items.pop(0)

    def get_nowait_batch(self, n):
        out, self.items = self.items[:n], self.items[n:]
        return out


class Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def restore_environment():
    """logs.setup() records the user's choices in os.environ; put it back after each test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    logs.setup()


@pytest.fixture
def text_logs():
    logs.setup(fmt="text")


def test_epoch_and_step_lines():
    line = epoch_line({"epochs": 20, "metrics": METRICS})
    assert line == ("epoch 3/20 | loss 9.1234 (recall 7.0000, rank 1.2500) | valid ndcg@10 0.0421 hr@10 0.0833 "
                    "(best 0.0421) | 2210 samples/s | 9.8 s")
    assert "valid" not in epoch_line({"metrics": {"epoch": 2, "loss/total": 1.0}})  # no validation that epoch
    bar = step_line({"epoch": 3, "epochs": 20, "step": 30, "steps": 120, "loss": 7.5, "steps_per_s": 4.21})
    assert bar == "epoch 3/20 [######------------------] 30/120 loss 7.5000 4.2 steps/s"


def test_not_a_tty_one_plain_line_per_epoch_and_no_step_lines(text_logs, capsys):
    printer = ProgressPrinter(ListQueue(), stream=io.StringIO())
    for step in (10, 20, 30):
        printer.handle({"kind": "step", "epoch": 1, "epochs": 2, "step": step, "steps": 40})
    printer.handle({"kind": "epoch", "epochs": 2, "metrics": {**METRICS, "epoch": 1}})
    printer.handle({"kind": "epoch", "epochs": 2, "metrics": {**METRICS, "epoch": 2}})
    err = capsys.readouterr().err
    assert "\r" not in err and printer.stream.getvalue() == ""
    lines = err.strip().splitlines()
    assert len(lines) == 2
    assert "INFO p5ray.train: epoch 1/2 | loss 9.1234" in lines[0] and "epoch 2/2" in lines[1]


def test_on_a_tty_steps_update_in_place_then_the_epoch_line(text_logs, capsys):
    tty = Tty()
    printer = ProgressPrinter(ListQueue(), stream=tty)
    printer.handle({"kind": "step", "epoch": 1, "epochs": 2, "step": 10, "steps": 40})
    printer.handle({"kind": "step", "epoch": 1, "epochs": 2, "step": 20, "steps": 40})
    printer.handle({"kind": "epoch", "epochs": 2, "metrics": {**METRICS, "epoch": 1}})
    screen = tty.getvalue()
    assert screen.count("\r") == 3 and "\n" not in screen  # two bars, then the bar cleared
    assert screen.startswith("\repoch 1/2 [######") and screen.endswith("\r\x1b[K")
    assert capsys.readouterr().err.count("\n") == 1


def test_json_format_progress_lines_carry_the_numbers(capsys):
    logs.setup(fmt="json")
    printer = ProgressPrinter(ListQueue(), stream=Tty())  # a terminal, but JSON: no step bars
    printer.handle({"kind": "step", "epoch": 1, "epochs": 2, "step": 10, "steps": 40})
    printer.handle({"kind": "epoch", "epochs": 2, "metrics": METRICS})
    assert printer.stream.getvalue() == ""
    (line,) = capsys.readouterr().err.strip().splitlines()
    record = json.loads(line)
    assert record["logger"] == "p5ray.train" and record["event"] == "epoch"
    assert (record["epoch"], record["epochs"]) == (3, 2)
    assert record["metrics"]["valid/ndcg@10"] == 0.0421 and record["message"].startswith("epoch 3/2")


def test_quiet_prints_no_progress(capsys):
    logs.setup(quiet=True)
    printer = ProgressPrinter(ListQueue(), stream=Tty())
    printer.handle({"kind": "step", "epoch": 1, "epochs": 2, "step": 10, "steps": 40})
    printer.handle({"kind": "epoch", "epochs": 2, "metrics": METRICS})
    assert printer.stream.getvalue() == "" and capsys.readouterr().err == ""


def test_the_printer_thread_drains_the_queue_in_order(text_logs, capsys):
    queue = ListQueue()
    for epoch in (1, 2, 3):
        queue.put_nowait({"kind": "step", "epoch": epoch, "epochs": 3, "step": 1, "steps": 2})
        queue.put_nowait({"kind": "epoch", "epochs": 3, "metrics": {**METRICS, "epoch": epoch}})
    printer = ProgressPrinter(queue, stream=io.StringIO())
    printer._thread.start()
    printer.stop()
    lines = capsys.readouterr().err.strip().splitlines()
    assert [ln.split("epoch ")[1][:3] for ln in lines] == ["1/3", "2/3", "3/3"]


def test_runs_of_step_items_collapse_to_the_last():
    items = [{"kind": "step", "step": 1}, {"kind": "step", "step": 2}, {"kind": "epoch"}, {"kind": "step", "step": 3}]
    assert _latest_steps(items) == [{"kind": "step", "step": 2}, {"kind": "epoch"}, {"kind": "step", "step": 3}]


# -- rank 0's tracker ---------------------------------------------------------------------------


def loop_cfg(tmp_path: Path, **extra) -> dict:
    return {"config": {"train": {"epochs": 3, "lr": 0.001}, "model": {"dim": 16}}, "run_name": "r1",
            "run_dir": str(tmp_path / "run"), "progress": ListQueue(), **extra}


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(s.step, round(s.value, 6)) for s in events.Scalars(tag)]


def test_rank_0_records_history_progress_and_tensorboard(tmp_path):
    cfg = loop_cfg(tmp_path)
    tracker = RunTracker(cfg, rank=0)
    on_step = tracker.stepper(1)
    tracker.clock.interval_s = 0.0
    on_step(0, 10)  # the first call says nothing (no step done yet)
    on_step(5, 10, 7.5)
    for epoch, ndcg in ((1, 0.01), (2, 0.03)):
        tracker.epoch({"epoch": epoch, "loss/total": 9.0 - epoch, "valid/ndcg@10": ndcg, "note": "text"})
    tracker.close()
    kinds = [item["kind"] for item in cfg["progress"].items]
    assert kinds == ["step", "epoch", "epoch"]
    assert cfg["progress"].items[0]["step"] == 5 and cfg["progress"].items[0]["loss"] == 7.5
    assert tracker.meta() == {"history": [
        {"epoch": 1, "loss/total": 8.0, "valid/ndcg@10": 0.01}, {"epoch": 2, "loss/total": 7.0, "valid/ndcg@10": 0.03}]}
    assert scalars(tmp_path / "run", "valid/ndcg@10") == [(1, 0.01), (2, 0.03)]


def test_other_ranks_do_nothing(tmp_path):
    cfg = loop_cfg(tmp_path)
    tracker = RunTracker(cfg, rank=1)
    assert tracker.stepper(1) is None
    tracker.epoch({"epoch": 1, "loss/total": 1.0})
    tracker.close()
    assert cfg["progress"].items == [] and tracker.meta() == {"history": []}
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_keeps_its_history_and_replaces_replayed_epochs(tmp_path):
    first = RunTracker(loop_cfg(tmp_path), rank=0)
    for epoch in (1, 2, 3):
        first.epoch({"epoch": epoch, "valid/ndcg@10": 0.01 * epoch})
    first.close()
    # the run died after epoch 3 and restarts from the checkpoint of epoch 2
    restored = {"epoch": 2, "history": first.meta()["history"][:2]}
    second = RunTracker(loop_cfg(tmp_path), rank=0, restored_meta=restored)
    second.epoch({"epoch": 3, "valid/ndcg@10": 0.5})
    second.close()
    assert [(h["epoch"], h["valid/ndcg@10"]) for h in second.history] == [(1, 0.01), (2, 0.02), (3, 0.5)]
    assert scalars(tmp_path / "run", "valid/ndcg@10") == [(1, 0.01), (2, 0.02), (3, 0.5)]


def test_a_tracker_that_cannot_write_never_stops_training(tmp_path, capsys):
    logs.setup()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    tracker = RunTracker(loop_cfg(tmp_path, run_dir=str(blocker)), rank=0)
    tracker.epoch({"epoch": 1, "valid/ndcg@10": 0.1})
    tracker.close()
    assert tracker.history == [{"epoch": 1, "valid/ndcg@10": 0.1}] and tracker.tb is None
    assert "TensorBoard: cannot write" in capsys.readouterr().err


def test_mlflow_metric_names():
    assert mlflow_key("valid/ndcg@10") == "valid/ndcg_at_10"
    assert mlflow_key("loss/cross_sell") == "loss/cross_sell"


def test_mlflow_records_params_and_every_epoch_and_a_resume_continues_the_run(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    tracker = RunTracker(loop_cfg(tmp_path, mlflow_uri=uri), rank=0)
    for epoch in (1, 2):
        tracker.epoch({"epoch": epoch, "valid/ndcg@10": 0.01 * epoch, "loss/total": 9.0})
    tracker.close()
    run_id = tracker.meta()["tracking"]["mlflow_run_id"]
    resumed = RunTracker(loop_cfg(tmp_path, mlflow_uri=uri), rank=0, restored_meta={"epoch": 2, **tracker.meta()})
    resumed.epoch({"epoch": 3, "valid/ndcg@10": 0.05})
    resumed.close()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.001" and run.data.params["model.dim"] == "16"
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "valid/ndcg_at_10")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.01), (2, 0.02), (3, 0.05)]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_mlflow_uri_without_mlflow_is_a_one_line_user_error(monkeypatch):
    import sys

    from p5ray.errors import UserError

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    with pytest.raises(UserError, match="--mlflow-uri needs the mlflow package") as info:
        require_mlflow()
    assert "pip install mlflow" in info.value.one_line()
