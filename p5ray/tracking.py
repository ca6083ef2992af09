"""Rank 0's account of a training run, epoch by epoch (inside the Ray Train worker function).

    history      every epoch's numeric metrics; each checkpoint's meta.json carries the history up
                 to it, so the run report (p5ray/report.py) is rebuilt from the run directory alone
    progress     epochs and throttled steps put on the driver's queue (printed by p5ray/progress.py)
    TensorBoard  event files in RUN_DIR/tensorboard/, one scalar per metric per epoch
    MLflow       with --mlflow-uri: the flattened config as params, metrics every epoch; the run id
                 rides in meta.json, so --resume continues the same MLflow run

Ray Train V2 takes no Tune logger callbacks, hence rank 0 writes the trackers itself; a Tune sweep
has Tune's own logger callbacks (p5ray/tune.py) and passes none of run_dir / progress / mlflow_uri.
Every other rank gets a tracker that does nothing. A tracker never stops training: a failing
writer is logged once and dropped.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time

from p5ray.progress import StepClock

log = logging.getLogger(__name__)
TB_DIR = "tensorboard"
MLFLOW_EXPERIMENT = "p5ray"


def numeric(metrics: dict) -> dict:
    """The numbers of a metrics dict (ints stay ints: epoch, skipped_steps)."""
    return {
        k: v if isinstance(v, int) else float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def mlflow_key(key: str) -> str:
    """MLflow metric names allow letters, digits, `_ - . / :` and spaces: `valid/ndcg@10` -> `valid/ndcg_at_10`."""
    return re.sub(r"[^\w\-./: ]", "_", key.replace("@", "_at_"))


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class RunTracker:
    def __init__(self, loop_cfg: dict, rank: int, restored_meta: dict | None = None):
        self.enabled = rank == 0
        self.epochs = int(loop_cfg["config"]["train"]["epochs"])
        self.history: list[dict] = list((restored_meta or {}).get("history", [])) if self.enabled else []
        self.queue = loop_cfg.get("progress") if self.enabled else None
        self.clock = StepClock()
        self.tb = None
        self.tb_local = self.tb_remote = None
        self.mlflow = None
        self.mlflow_run_id = ((restored_meta or {}).get("tracking") or {}).get("mlflow_run_id")
        if not self.enabled:
            return
        first_epoch = int((restored_meta or {}).get("epoch", 0)) + 1
        if loop_cfg.get("run_dir"):
            self._open_tensorboard(loop_cfg["run_dir"], first_epoch, loop_cfg["config"])
        if loop_cfg.get("mlflow_uri"):
            self._open_mlflow(loop_cfg["mlflow_uri"], loop_cfg.get("run_name") or "p5ray", loop_cfg["config"])

    @classmethod
    def open(cls, loop_cfg: dict, rank: int, restored=None) -> RunTracker:
        """The tracker of this worker; `restored` (a Ray Train Checkpoint) brings back its history."""
        meta = None
        if restored is not None and rank == 0:
            from p5ray import checkpoint as ckpt

            with restored.as_directory() as d:
                meta = ckpt.read_meta(d)
        return cls(loop_cfg, rank, meta)

    # -- per step and per epoch ----------------------------------------------------------------

    def stepper(self, epoch: int):
        """The on_step hook of run_epoch for this epoch (None on other ranks: no per-step cost)."""
        if self.queue is None:
            return None
        start = time.monotonic()

        def on_step(step: int, steps: int, loss: float | None = None) -> None:
            if step == 0 or not self.clock.due():
                return
            rate = step / max(time.monotonic() - start, 1e-9)
            self._send({"kind": "step", "epoch": epoch, "epochs": self.epochs, "step": step,
                        "steps": steps, "loss": loss, "steps_per_s": rate})

        return on_step

    def epoch(self, metrics: dict) -> None:
        """Record one epoch's metrics: history, the driver's progress line, TensorBoard, MLflow."""
        if not self.enabled:
            return
        values = numeric(metrics)
        self.history = [h for h in self.history if h.get("epoch") != values.get("epoch")] + [values]
        self._send({"kind": "epoch", "epochs": self.epochs, "metrics": values})
        step = int(values.get("epoch", len(self.history)))
        if self.tb is not None:
            self._guard("TensorBoard", self._write_tensorboard, values, step)
        if self.mlflow is not None:
            self._guard("MLflow", self._write_mlflow, values, step)

    def meta(self) -> dict:
        """What each checkpoint's meta.json carries for the report and for --resume."""
        out = {"history": list(self.history)}
        if self.mlflow_run_id:
            out["tracking"] = {"mlflow_run_id": self.mlflow_run_id}
        return out

    def close(self) -> None:
        if self.tb is not None:
            self._guard("TensorBoard", self.tb.close)
            self._sync_tensorboard()
            self.tb = None
        if self.mlflow is not None:
            self._guard("MLflow", self.mlflow.set_terminated, self.mlflow_run_id)
            self.mlflow = None

    # -- the writers ---------------------------------------------------------------------------

    def _send(self, item: dict) -> None:
        if self.queue is None:
            return
        try:
            self.queue.put_nowait(item)
        except Exception:  # full, or the driver is gone: progress is best effort
            pass

    def _guard(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:
            log.warning("%s: %s: %s; no more %s records for this run", what, type(exc).__name__, exc, what)
            if what == "TensorBoard":
                self.tb = None
            else:
                self.mlflow = None

    def _open_tensorboard(self, run_dir: str, first_epoch: int, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        target = f"{run_dir.rstrip('/')}/{TB_DIR}"
        if "://" in run_dir:  # s3://, gs://: write locally, copy after every epoch
            self.tb_local, self.tb_remote = tempfile.mkdtemp(prefix="p5ray-tb-"), target
            target = self.tb_local
        try:
            os.makedirs(target, exist_ok=True)
            # purge_step: a resumed run replays epochs from its checkpoint; TensorBoard drops the old ones
            self.tb = SummaryWriter(target, purge_step=first_epoch if first_epoch > 1 else None)
            if first_epoch == 1:
                import yaml

                self.tb.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        except Exception as exc:
            log.warning("TensorBoard: cannot write to %s (%s); no event files for this run", target, exc)
            self.tb = None

    def _write_tensorboard(self, values: dict, step: int) -> None:
        for key, value in values.items():
            if key != "epoch":
                self.tb.add_scalar(key, value, step)
        self.tb.flush()
        self._sync_tensorboard()

    def _sync_tensorboard(self) -> None:
        if not self.tb_remote:
            return
        try:
            import pyarrow.fs

            fs, path = pyarrow.fs.FileSystem.from_uri(self.tb_remote)
            pyarrow.fs.copy_files(self.tb_local, path, destination_filesystem=fs)
        except Exception as exc:
            log.warning("TensorBoard: cannot copy event files to %s (%s)", self.tb_remote, exc)
            self.tb_remote = None

    def _open_mlflow(self, uri: str, run_name: str, config: dict) -> None:
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its file store unless told; a file: URI asks for exactly that
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            if self.mlflow_run_id is None:
                experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
                experiment_id = experiment.experiment_id if experiment else client.create_experiment(MLFLOW_EXPERIMENT)
                run = client.create_run(experiment_id, run_name=run_name, tags={"p5ray.run": run_name})
                self.mlflow_run_id = run.info.run_id
                params = [Param(k, str(v)[:500]) for k, v in sorted(flatten(config).items())]
                for i in range(0, len(params), 100):
                    client.log_batch(self.mlflow_run_id, params=params[i:i + 100])
            else:
                client.update_run(self.mlflow_run_id, status="RUNNING")
            self.mlflow = client
        except Exception as exc:
            log.warning("MLflow: cannot log to %s (%s: %s); training goes on without it", uri, type(exc).__name__, exc)
            self.mlflow = None

    def _write_mlflow(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), v, now, step) for k, v in values.items() if k != "epoch"]
        self.mlflow.log_batch(self.mlflow_run_id, metrics=metrics)


def require_mlflow() -> None:
    """--mlflow-uri needs the optional mlflow package: a one-line UserError (exit 2) without it."""
    from p5ray.errors import UserError

    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError("--mlflow-uri needs the mlflow package", "pip install mlflow, or drop --mlflow-uri") from None
