"""Ray Tune sweeps over the one training function (Ray's Train + Tune pattern, Train V2).

    run()            driver: search space -> Tuner(run_trial) -> leaderboard, best config, plots
      run_trial      one Tune trial: its sampled point -> Config -> train.build_trainer(...).fit()
        train_loop_per_worker   the same per-worker function as `p5ray train` (no second loop)

Metrics reach Tune through Ray's TuneReportCallback (each report carries `checkpoint_path`, so a
trial's best metric and its checkpoint always come from the same epoch). PBT also needs Tune
checkpoints to copy between trials: there a small callback hands every report to the trial,
which reports it to Tune with a pointer to the Train checkpoint (`_run_trial_pbt`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ray.train.v2.api.callback import UserCallback

from p5ray import dataset, tune_results
from p5ray.config import Config
from p5ray.errors import OutputExistsError, P5RayError, UserError
from p5ray.tune_space import Sweep, base_config, load_sweep, sample_point, trial_config

log = logging.getLogger(__name__)
SETUP_FILE = "sweep.json"  # what a sweep was started with; --resume checks it
DRIVER_CPU = 0.01  # a trial's own actor only waits on its TorchTrainer (Ray needs a non-empty bundle)


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs besides its sampled point (shipped once with tune.with_parameters)."""

    data_dir: str
    base: dict  # full config dict every trial starts from
    sweep: Sweep
    train_storage: str  # Train runs of the trials: TRAIN_STORAGE/<trial_id>/checkpoint_epoch_*

    def config(self, point: dict) -> Config:
        return trial_config(self.base, point, self.sweep)

    def to_json(self) -> dict:
        return {"data_dir": self.data_dir, "base": self.base, "sweep": self.sweep.to_dict()}


# -- one trial -------------------------------------------------------------------------------


def run_trial(point: dict, setup: TrialSetup) -> None:
    """The Tune trainable: build the same TorchTrainer as `p5ray train` and fit it."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from p5ray.train import build_trainer

    cfg = setup.config(point)
    trial_id = ray.tune.get_context().get_trial_id()
    _prepare_trial_process()
    if setup.sweep.scheduler["type"] == "pbt":
        return _run_trial_pbt(cfg, setup, trial_id)
    # a stable Train run name: a restored trial (--resume) continues its Train run from its checkpoint
    trainer = build_trainer(
        setup.data_dir, cfg, setup.train_storage, trial_id,
        callbacks=[TuneReportCallback()], **_scoring(setup.sweep),
    )
    trainer.fit()


def _prepare_trial_process() -> None:
    """Quiet Ray Data progress bars; give the Train controller this cluster's address.

    The address reaches the controller's PlacementGroupCleaner. When Tune stops a trial (ASHA), its Train controller dies with it and the cleaner must free the
    workers' placement group; it finds the cluster through the state API without an address,
    which fails when one machine runs several Ray instances, leaking the trial's CPUs.
    """
    import ray
    import ray.data
    from ray.train.v2._internal import constants

    from p5ray.raycluster import verbose

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    constants.ENV_VARS_TO_PROPAGATE.add("RAY_ADDRESS")
    if not verbose():  # the trial's datasets carry this process's DataContext (the driver's is set quiet)
        ray.data.DataContext.get_current().enable_progress_bars = False


def _scoring(sweep: Sweep) -> dict:
    return {"objective": sweep.objective, "score": sweep.metric, "score_order": sweep.mode}


def _run_trial_pbt(cfg: Config, setup: TrialSetup, trial_id: str) -> None:
    """PBT: report every epoch to Tune with a pointer checkpoint, and start from one if given."""
    import ray.tune
    from ray.util.queue import Empty, Queue

    from p5ray.train import build_trainer

    resume_from = None
    start = ray.tune.get_checkpoint()  # a PBT donor's (or this trial's own) latest epoch
    if start:
        with start.as_directory() as d:
            resume_from = json.loads((Path(d) / "pointer.json").read_text())["checkpoint_path"]
    suffix = hashlib.sha1(resume_from.encode()).hexdigest()[:8] if resume_from else "start"
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = build_trainer(
        setup.data_dir, cfg, setup.train_storage, f"{trial_id}-{suffix}",
        callbacks=[_ReportToTrial(queue)], resume_from=resume_from, keep_all=True, **_scoring(setup.sweep),
    )
    done, errors = threading.Event(), []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # re-raised below, in the trial's own thread
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=fit, daemon=True).start()
    while not (done.is_set() and queue.empty()):
        try:
            item = queue.get(timeout=1.0)
        except Empty:
            continue
        if not item.get("checkpoint_path"):
            ray.tune.report(item)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "pointer.json").write_text(json.dumps({"checkpoint_path": item["checkpoint_path"]}))
            ray.tune.report(item, checkpoint=ray.tune.Checkpoint.from_directory(tmp))
    if errors:
        raise errors[0]


class _ReportToTrial(UserCallback):
    """Runs in the Train controller: hands rank 0's metrics (+ checkpoint path) to the trial."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        item = dict(metrics[0])
        if checkpoint:
            item["checkpoint_path"] = checkpoint.path
        self.queue.put(item)


# -- the driver ------------------------------------------------------------------------------


@dataclass
class SweepResult:
    sweep_dir: str
    best_config: str  # absolute path of best_config.yaml
    leaderboard: str
    rows: list[dict]  # tune_results.leaderboard(): best first
    metric: str


def run(
    data_dir: str,
    search_space: str,
    num_samples: int | None = None,
    storage: str = "runs",
    name: str | None = None,
    resume: bool = False,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    mlflow_uri: str | None = None,
) -> SweepResult:
    """Run (or --resume) a sweep; write leaderboard.csv, best_config.yaml and plots beside it."""
    import ray.tune

    from p5ray.raycluster import ensure_ray, storage_path

    data_dir = str(dataset.check_data_dir(data_dir).resolve())
    sweep = load_sweep(search_space, num_samples)
    base = base_config(sweep, config_path, overrides)
    storage = storage_path(storage)
    if "://" in storage:
        raise UserError(f"--storage {storage}: tune needs a local or mounted shared path", "use an NFS mount on a cluster")
    name = name or time.strftime("tune-%Y%m%d-%H%M%S")
    sweep_dir = os.path.join(storage, name)
    setup = TrialSetup(data_dir, base, sweep, os.path.join(sweep_dir, "train"))
    setup.config(sample_point(sweep))  # a bad combination fails here, not in every trial
    _check_sweep_dir(sweep_dir, setup, resume)
    mlflow = _mlflow_callback(mlflow_uri, name) if mlflow_uri else None
    if sweep.search["type"] == "optuna":
        _require_optuna()
    if base["train"]["eval_every"] > 1:  # epochs without validation report no metric
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    ensure_ray(sweep.workers_per_trial * sweep.cpus_per_worker + sweep.data_cpus)
    concurrency = plan_concurrency(sweep, base["train"]["use_gpu"], _cluster_resources())
    log.info("sweep %s: %d trials, %d at a time", sweep_dir, sweep.num_samples, concurrency)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, setup=setup), {"cpu": DRIVER_CPU})
    if resume:
        tuner = ray.tune.Tuner.restore(sweep_dir, trainable=trainable, resume_errored=True)
    else:
        Path(sweep_dir).mkdir(parents=True)
        Path(sweep_dir, SETUP_FILE).write_text(json.dumps(setup.to_json(), indent=1, sort_keys=True))
        tuner = _build_tuner(trainable, setup, storage, name, concurrency, [mlflow] if mlflow else [])
    results = tuner.fit()
    return _collect(results, setup, sweep_dir, storage, name)


def _collect(results, setup: TrialSetup, sweep_dir: str, storage: str, name: str) -> SweepResult:
    """Outputs from the trial directories; an interrupted or all-failed sweep is an error."""
    import ray.tune

    statuses = {t.trial_id: t.status for t in ray.tune.ExperimentAnalysis(sweep_dir).trials}
    rows = tune_results.write_outputs(sweep_dir, setup, statuses)
    unfinished = [t for t, status in statuses.items() if status not in ("TERMINATED", "ERROR")]
    if unfinished or len(statuses) < setup.sweep.num_samples:
        log.warning(
            "sweep interrupted with %d of %d trials finished; continue it with --resume --storage %s --name %s",
            len(statuses) - len(unfinished), setup.sweep.num_samples, storage, name,
        )
        raise KeyboardInterrupt
    if not any(r["status"] == "TERMINATED" and r["best_epoch"] for r in rows):
        errors = [r["error"] for r in rows if r.get("error")] or [str(e) for e in results.errors]
        raise P5RayError(f"no trial finished with a validated epoch: {errors[0] if errors else 'unknown reason'}")
    path = Path(sweep_dir).resolve()
    return SweepResult(str(path), str(path / "best_config.yaml"), str(path / "leaderboard.csv"), rows, setup.sweep.metric)


def _check_sweep_dir(sweep_dir: str, setup: TrialSetup, resume: bool) -> None:
    import ray.tune

    setup_file = Path(sweep_dir, SETUP_FILE)
    if not resume:
        if os.path.exists(sweep_dir):
            raise OutputExistsError(f"sweep {sweep_dir} already exists", "pass --resume to continue it, or another --name")
        return
    if not ray.tune.Tuner.can_restore(sweep_dir) or not setup_file.is_file():
        raise UserError(f"--resume: no sweep to continue at {sweep_dir}", "give the --storage and --name of the sweep")
    stored = json.loads(setup_file.read_text())
    if stored != json.loads(json.dumps(setup.to_json())):
        raise UserError(
            f"--resume: the data, config or search space differ from those the sweep {sweep_dir} started with",
            f"resume with the same --data/--config/--set/--search-space/--num-samples (see {setup_file}), or start another --name",
        )


def _cluster_resources() -> dict:
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return {
        "CPU": ray.cluster_resources().get("CPU", 0.0),
        "GPU": ray.cluster_resources().get("GPU", 0.0),
        "node_cpus": max((n.get("CPU", 0.0) for n in nodes), default=0.0),
    }


def plan_concurrency(sweep: Sweep, use_gpu: bool, cluster: dict) -> int:
    """Trials that run at once, leaving `data_cpus` for Ray Data; UserError if one cannot fit."""
    per_trial = sweep.workers_per_trial * sweep.cpus_per_worker
    free = cluster["CPU"] - sweep.data_cpus
    what = f"{sweep.workers_per_trial} worker(s) x {sweep.cpus_per_worker} CPU"
    if per_trial + DRIVER_CPU > free:
        raise UserError(
            f"a trial needs {per_trial} CPUs ({what}) plus {sweep.data_cpus} left for Ray Data, "
            f"but the cluster has {cluster['CPU']:g}",
            "lower workers_per_trial or cpus_per_worker in the search space, or add nodes",
        )
    if sweep.cpus_per_worker > cluster["node_cpus"]:
        raise UserError(
            f"a worker needs {sweep.cpus_per_worker} CPUs but the largest node has {cluster['node_cpus']:g}",
            "lower cpus_per_worker in the search space",
        )
    fits = int(free // (per_trial + DRIVER_CPU))
    if use_gpu:
        if sweep.workers_per_trial > cluster["GPU"]:
            raise UserError(
                f"a trial needs {sweep.workers_per_trial} GPU(s) but the cluster has {cluster['GPU']:g}",
                "lower workers_per_trial, or drop train.use_gpu",
            )
        fits = min(fits, int(cluster["GPU"] // sweep.workers_per_trial))
    wanted = sweep.max_concurrent_trials or sweep.num_samples
    if wanted > fits and sweep.max_concurrent_trials:
        log.warning("max_concurrent_trials %d does not fit; running %d at a time", wanted, fits)
    return max(1, min(wanted, fits))


def _build_tuner(trainable, setup: TrialSetup, storage: str, name: str, concurrency: int, loggers: list):
    """Tuner over the trainable; Tune's default loggers (CSV, JSON, TensorBoard) plus `loggers`."""
    import ray.tune

    sweep = setup.sweep
    callbacks = [tune_results.ProgressCallback(sweep.metric, sweep.mode, sweep.num_samples), *loggers]
    scheduler = _scheduler(sweep, setup.base["train"]["epochs"])
    if sweep.scheduler["type"] == "asha":
        callbacks.append(tune_results.SchedulerState(scheduler))
    return ray.tune.Tuner(
        trainable,
        param_space={d.key: d.domain() for d in sweep.dims},
        tune_config=ray.tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            num_samples=sweep.num_samples,
            max_concurrent_trials=None if sweep.search["type"] == "random" else concurrency,
            scheduler=scheduler,
            search_alg=_searcher(sweep, concurrency),
            trial_dirname_creator=trial_dirname,
        ),
        run_config=ray.tune.RunConfig(
            name=name,
            storage_path=storage,
            verbose=0,
            callbacks=callbacks,
            failure_config=ray.tune.FailureConfig(max_failures=1),
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=None),
        ),
    )


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _scheduler(sweep: Sweep, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    opts = sweep.scheduler
    if opts["type"] == "asha":
        grace = opts["grace_period"]
        if grace > epochs:
            log.warning("scheduler.grace_period %d is more than train.epochs %d: using %d", grace, epochs, epochs)
        return ASHAScheduler(
            time_attr="epoch", max_t=epochs, grace_period=min(grace, epochs), reduction_factor=opts["reduction_factor"]
        )
    if opts["type"] == "pbt":
        dims = {d.key: d for d in sweep.dims}
        return PopulationBasedTraining(
            time_attr="epoch",
            perturbation_interval=opts["perturbation_interval"],
            quantile_fraction=opts["quantile_fraction"],
            resample_probability=opts["resample_probability"],
            hyperparam_mutations={k: dims[k].domain() for k in opts["mutations"]},
        )
    return FIFOScheduler()


def _searcher(sweep: Sweep, concurrency: int):
    from ray.tune.search import BasicVariantGenerator

    if sweep.search["type"] == "random":  # Tune applies max_concurrent_trials to Searchers only
        return BasicVariantGenerator(max_concurrent=concurrency, random_state=sweep.seed)
    _require_optuna()
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=sweep.seed)


def _require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError("search: optuna needs the optuna package", "pip install optuna, or use search: random") from None


def _mlflow_callback(uri: str, name: str):
    try:
        import mlflow  # noqa: F401
        from ray.air.integrations.mlflow import MLflowLoggerCallback
    except ImportError:
        raise UserError("--mlflow-uri needs the mlflow package", "pip install mlflow, or drop --mlflow-uri") from None
    return MLflowLoggerCallback(tracking_uri=uri, experiment_name=name, save_artifact=False)


def load_setup(sweep_dir: str | Path) -> TrialSetup:
    """The TrialSetup a sweep started with, from its sweep.json."""
    data = json.loads(Path(sweep_dir, SETUP_FILE).read_text())
    return TrialSetup(data["data_dir"], data["base"], Sweep.from_dict(data["sweep"]), str(Path(sweep_dir, "train")))


def regenerate_outputs(sweep_dir: str | Path) -> list[dict]:
    """Rewrite leaderboard.csv, best_config.yaml, plots and report.md of a sweep (no Ray cluster)."""
    return tune_results.write_outputs(sweep_dir, load_setup(sweep_dir))


def shutdown_ray() -> None:
    import ray

    ray.shutdown()


def print_summary(result: SweepResult, out=sys.stdout) -> None:
    """The leaderboard's top rows as a table, then the paths (best_config last)."""
    print(tune_results.summary_table(result.rows, result.metric), file=out)
    print(f"leaderboard: {result.leaderboard}", file=out)
    best = result.rows[0]
    if best.get("checkpoint"):
        print(f"best_checkpoint: {best['checkpoint']}", file=out)
    print(f"best_config: {result.best_config}", file=out, flush=True)
