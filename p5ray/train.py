"""Training: a pure-torch epoch function, a Ray Train per-worker function, and the fit() driver.

    fit()                      driver: Ray Data datasets + TorchTrainer(train_loop_per_worker)
      train_loop_per_worker    one DDP worker: its shard, the model, epochs, validation, checkpoints
        run_epoch              pure torch: batches -> optimizer steps

Ray Tune runs the same train_loop_per_worker (p5ray/tune.py); there is no second loop.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from p5ray import checkpoint as ckpt
from p5ray import dataset, faults
from p5ray.config import Config, from_dict, to_dict
from p5ray.evaluate import ranking_metrics
from p5ray.hardware import autocast_dtype, bf16_supported, collective_device, torch_backend
from p5ray.losses import GradNormBalancer, MultiTaskLoss
from p5ray.model import ModelSpec, P5Rec
from p5ray.tasks import active_tasks
from p5ray.tracking import RunTracker

log = logging.getLogger(__name__)
SCORE = "valid/ndcg@10"


# -- model construction -------------------------------------------------------------------


def training_rating_mean(train: pa.Table) -> float:
    """Mean training rating: the rating head's bias (0 when the data has no ratings)."""
    if "ratings" not in train.column_names:
        return 0.0
    values = pc.list_flatten(train.column("ratings"))
    mean = pc.mean(values).as_py() if len(values) else None
    return float(mean) if mean is not None and math.isfinite(mean) else 0.0


def build_spec(cfg: Config, manifest: dict, rating_mean: float = 0.0) -> ModelSpec:
    m = cfg.model
    tasks = tuple(t for t in active_tasks(bool(manifest.get("has_ratings"))) if getattr(cfg.loss.alpha, t) > 0)
    if "recall" not in tasks:
        tasks = ("recall",) + tasks
    use = m.use_features
    return ModelSpec(
        num_items=int(manifest["items"]),
        num_users=int(manifest["users"]),
        dim=m.dim, layers=m.layers, heads=m.heads, dropout=m.dropout, emb_dropout=m.emb_dropout,
        max_len=m.max_len, mixture=m.mixture, experts=m.experts, tower_dim=m.tower_dim, tasks=tasks,
        rating_mean=rating_mean,
        item_features=dataset.feature_specs(manifest, "item_features") if use else (),
        user_features=dataset.feature_specs(manifest, "user_features") if use else (),
    )


def build_model(spec: ModelSpec, items: pa.Table, users: pa.Table) -> P5Rec:
    model = P5Rec(spec)
    if model.items.features is not None:
        for name, values in dataset.feature_values(items, spec.item_features, "item_idx").items():
            model.items.features.set_values(name, values)
    if model.user_features is not None:
        for name, values in dataset.feature_values(users, spec.user_features, "user_idx").items():
            model.user_features.set_values(name, values)
    return model


def recall_loss_kind(cfg: Config, num_items: int) -> str:
    kind = cfg.loss.recall_loss
    if kind == "auto":
        return "full_softmax" if num_items <= cfg.loss.full_softmax_max_items else "sampled_softmax"
    return kind


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -- the epoch --------------------------------------------------------------------------------


@dataclass
class EpochData:
    rows: dict  # training windows: user_idx, items, ratings, weight (numpy)
    user_items: dict  # user_idx -> set of training items (negatives never come from here)
    sampler: dataset.NegativeSampler
    pool_probs: torch.Tensor  # (N,) sampling distribution of the shared negative pool


def run_epoch(
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    data: EpochData,
    cfg: Config,
    steps: int,
    rng: np.random.Generator,
    device: torch.device,
    balancer: GradNormBalancer | None = None,
    global_step: int = 0,
    on_step=None,
) -> dict:
    """One pass of `steps` optimizer steps over a shuffled permutation of the local rows.

    `on_step(step, steps, mean_loss_so_far)`, if given, is called before each step (progress).
    """
    loss_fn.train()
    bs, max_len = cfg.train.batch_size, cfg.model.max_len
    lengths = np.fromiter((len(s) for s in data.rows["items"]), np.int64, count=len(data.rows["items"]))
    order = dataset.bucketed_order(lengths, bs, rng) if cfg.train.bucket_by_length else rng.permutation(len(lengths))
    order = np.resize(order, steps * bs) if len(order) < steps * bs else order
    sums: dict[str, float] = {}
    skipped = 0
    inner = loss_fn.module if hasattr(loss_fn, "module") else loss_fn
    amp = autocast_dtype(cfg.train.precision, device.type, bf16_supported(device))
    for step in range(steps):
        if on_step is not None:
            on_step(step, steps, sums.get("total", 0.0) / step if step else None)
        idx = order[step * bs:(step + 1) * bs]
        rows = {k: v[idx] for k, v in data.rows.items()}
        batch = dataset.collate(rows, max_len, data.sampler, cfg.loss.rank_negatives, data.user_items)
        pool = torch.multinomial(data.pool_probs, cfg.loss.num_negatives, replacement=True)
        batch["negatives"] = pool
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            total, parts = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        if balancer is not None and balancer.due(global_step + step):
            _gradnorm_update(inner, parts, balancer)
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_(loss_fn.parameters(), cfg.train.grad_clip or float("inf"))
        if not torch.isfinite(norm):  # identical on every rank after DDP's all-reduce
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
        else:
            optimizer.step()
        scheduler.step()
        if torch.isfinite(norm):
            for name, value in {"total": total, **parts}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
    out = {f"loss/{k}": v / max(1, steps - skipped) for k, v in sums.items()}
    out["skipped_steps"] = skipped
    return out


def _gradnorm_update(inner: MultiTaskLoss, parts: dict, balancer: GradNormBalancer) -> None:
    shared = inner.model.encoder.norm.weight  # the last shared layer
    norms = []
    for task in inner.tasks:
        (g,) = torch.autograd.grad(parts[task], shared, retain_graph=True, allow_unused=True)
        norms.append(torch.zeros(()) if g is None else g.norm().cpu())
    losses = torch.stack([parts[t].detach().float().cpu() for t in inner.tasks])
    norms = torch.stack(norms)
    if dist.is_available() and dist.is_initialized():
        both = torch.cat([losses, norms]).to(shared.device)
        dist.all_reduce(both)
        both = both.cpu() / dist.get_world_size()
        losses, norms = both[: len(inner.tasks)], both[len(inner.tasks):]
    inner.balance.copy_(balancer.update(inner.balance.cpu(), losses, norms).to(inner.balance.device))


def collect_rows(iterator, columns=("user_idx", "items", "ratings", "weight")) -> dict:
    """Read a whole Ray Data shard into numpy arrays (the shards here fit in memory)."""
    parts: dict[str, list] = {c: [] for c in columns}
    for batch in iterator.iter_batches(batch_size=4096, batch_format="numpy"):
        for c in columns:
            if c in batch:
                parts[c].append(batch[c])
    out = {}
    for c, chunks in parts.items():
        if chunks:
            out[c] = np.concatenate(chunks) if chunks[0].dtype != object else _concat_objects(chunks)
    n = len(out.get("items", []))
    out.setdefault("weight", np.ones(n, dtype=np.float32))
    return out


def _concat_objects(chunks: list) -> np.ndarray:
    out = np.empty(sum(len(c) for c in chunks), dtype=object)
    i = 0
    for c in chunks:
        out[i:i + len(c)] = list(c)
        i += len(c)
    return out


def early_stopping(state: dict, score: float, epoch: int, patience: int) -> bool:
    """Record a validation score in `state` (best, best_epoch, bad_epochs, epoch); True = stop.

    Only a strictly better score resets the count, so a plateau stops after `patience` epochs;
    patience 0 never stops. Not finite (a diverged model) counts as no better.
    """
    if math.isfinite(score) and score > state["best"] + 1e-9:
        state.update(best=score, best_epoch=epoch, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch
    return bool(patience) and state["bad_epochs"] >= patience


# -- one Ray Train worker -------------------------------------------------------------------


def _all_reduce(values: list[float], op=None) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(dist.get_backend()))
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def _user_items(train: pa.Table) -> dict[int, set[int]]:
    return {
        int(u): set(items)
        for u, items in zip(train.column("user_idx").to_pylist(), train.column("items").to_pylist(), strict=True)
    }


def _pool_probs(items: pa.Table, num_items: int) -> torch.Tensor:
    """Shared-negative sampling distribution: popularity^0.75 (smoothed), padding excluded."""
    probs = np.zeros(num_items + 1, dtype=np.float64)
    probs[items.column("item_idx").to_numpy()] = items.column("train_count").to_numpy() + 1.0
    probs = probs**0.75
    probs[0] = 0.0
    return torch.as_tensor(probs / probs.sum(), dtype=torch.float32)


def checkpoint_users(data_dir: str, users: pa.Table) -> pa.Table:
    """users.parquet of a checkpoint: vocab + features + every known interaction (history)."""
    seqs = dataset.read_table(data_dir, "sequences.parquet")
    history = dict(zip(seqs.column("user_idx").to_pylist(), seqs.column("items").to_pylist(), strict=True))
    column = pa.array([history.get(u, []) for u in users.column("user_idx").to_pylist()], pa.list_(pa.int32()))
    keep = [c for c in users.column_names if c != "history"]
    return users.select(keep).append_column("history", column)


def _validate(model: P5Rec, valid: dict, cfg: Config, rank: int, world: int, device) -> dict:
    n = len(valid["user_idx"])
    picked = np.arange(n)
    if cfg.train.valid_users and cfg.train.valid_users < n:
        picked = np.sort(np.random.default_rng(cfg.train.seed).choice(n, cfg.train.valid_users, replace=False))
    mine = picked[rank::world]
    split_part = _split_from_rows(valid, mine)
    local = ranking_metrics(model, split_part, cfg.eval, device=device) if len(mine) else {}
    keys = ("full/ndcg@10", "full/hr@10", "full/ndcg@20", "full/hr@20", "full/mrr")
    sums = _all_reduce([local.get(k, 0.0) * len(mine) for k in keys] + [float(len(mine))])
    total = max(sums[-1], 1.0)
    return {"valid/" + k.split("/", 1)[1]: s / total for k, s in zip(keys, sums[:-1], strict=True)}


def _split_from_rows(valid: dict, index: np.ndarray):
    from p5ray.evaluate import Split

    return Split(
        users=valid["user_idx"][index].astype(np.int64),
        histories=[np.asarray(valid["history"][i], dtype=np.int64) for i in index],
        targets=valid["target"][index].astype(np.int64),
        target_ratings=None,
        all_items=[],
    )


def _optimizer(loss_fn: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    decay = [p for p in loss_fn.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in loss_fn.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.98))


def _apply_config_rates(optimizer, scheduler, cfg: Config) -> None:
    """After a restore, the config's lr and weight decay win over the saved ones.

    A no-op when resuming with the same config; PBT restores a checkpoint under a mutated one.
    """
    scheduler.base_lrs = [cfg.train.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = cfg.train.lr
        group["lr"] = cfg.train.lr * factor(scheduler.last_epoch)
    optimizer.param_groups[0]["weight_decay"] = cfg.train.weight_decay  # group 0: the decayed weights


def train_loop_per_worker(loop_cfg: dict) -> None:
    """The Ray Train worker function (also what every Ray Tune trial runs)."""
    import ray.train
    import ray.train.torch

    from p5ray.raycluster import quiet_train_worker

    cfg = from_dict(loop_cfg["config"])
    data_dir = loop_cfg["data_dir"]
    if not loop_cfg.get("verbose"):
        quiet_train_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.train.threads_per_worker or cfg.train.cpus_per_worker))
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)

    manifest = dataset.read_manifest(data_dir)
    items = dataset.read_table(data_dir, "items.parquet")
    users = dataset.read_table(data_dir, "users.parquet")
    train_table = dataset.read_table(data_dir, "train.parquet")
    spec = build_spec(cfg, manifest, training_rating_mean(train_table))
    model = build_model(spec, items, users)
    if loop_cfg.get("init_from"):
        from p5ray.warmstart import warm_start

        warm_start(model, loop_cfg["init_from"], items)
    rows = collect_rows(ray.train.get_dataset_shard("train"))
    faults.corrupt_shard(loop_cfg.get("fault"), rank, rows, spec.num_items)  # test-only; inert unless set
    valid = collect_rows(ray.train.get_dataset_shard("valid"), ("user_idx", "history", "target"))
    user_items = _user_items(train_table)
    loss_fn = MultiTaskLoss(
        model,
        alpha=to_dict(cfg.loss.alpha),
        recall_loss=recall_loss_kind(cfg, spec.num_items),
        weighting=cfg.loss.weighting,
        logq_correction=cfg.loss.logq_correction,
        label_smoothing=cfg.loss.label_smoothing,
        contrastive=cfg.loss.contrastive,
        contrastive_temperature=cfg.loss.contrastive_temperature,
        sampling_probs=_pool_probs(items, spec.num_items),
    )
    loss_fn = ray.train.torch.prepare_model(
        loss_fn, parallel_strategy_kwargs={"broadcast_buffers": False}  # buffers are data, equal everywhere
    )
    inner: MultiTaskLoss = loss_fn.module if hasattr(loss_fn, "module") else loss_fn
    optimizer = _optimizer(loss_fn, cfg)
    steps = int(_all_reduce([max(1, len(rows["items"]) // cfg.train.batch_size)], dist.ReduceOp.MIN)[0])
    warmup = int(cfg.train.warmup_epochs * steps)
    total_steps = steps * cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup, total_steps, cfg.train.min_lr_ratio)
    )
    balancer = GradNormBalancer(len(inner.tasks), cfg.loss.gradnorm_alpha) if cfg.loss.weighting == "gradnorm" else None
    state = {"epoch": 0, "best": -1.0, "best_epoch": -1, "bad_epochs": 0}
    faults.watch_steps(loop_cfg.get("fault"), rank, optimizer, scheduler, steps)  # test-only; inert unless set

    # a restart (worker failure, --resume, Tune PBT) continues from the latest checkpoint: weights,
    # optimizer, scheduler, task weights and the epoch; the per-epoch seeds below replay the data
    restored = ray.train.get_checkpoint()
    if restored is None and loop_cfg.get("resume_from"):  # Tune PBT: go on from another trial's epoch
        restored = ray.train.Checkpoint(loop_cfg["resume_from"])
    unregistered = newer_checkpoint_on_disk(loop_cfg.get("run_dir"), restored)
    if unregistered:
        restored = ray.train.Checkpoint(unregistered)
    if restored:
        with restored.as_directory() as d:
            weights, saved = ckpt.load_for_resume(d, device)  # checksums verified first
        inner.model.load_state_dict(weights)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        _apply_config_rates(optimizer, scheduler, cfg)
        inner.balance.copy_(saved["balance"].to(inner.balance.device))
        inner.log_vars.data.copy_(saved["log_vars"].to(inner.log_vars.device))
        state = {k: saved[k] for k in state}
        if rank == 0:
            log.warning("resuming from %s at epoch %d", restored.path, state["epoch"])

    tracker = RunTracker.open(loop_cfg, rank, restored)
    ckpt_users = checkpoint_users(data_dir, users) if rank == 0 else None
    sampler = dataset.NegativeSampler(spec.num_items, np.random.default_rng())
    data = EpochData(rows, user_items, sampler, _pool_probs(items, spec.num_items))
    for epoch in range(state["epoch"], cfg.train.epochs):
        # every epoch's randomness derives from (seed, epoch, rank): a restart replays it exactly
        rng = np.random.default_rng([cfg.train.seed, epoch, rank])
        sampler.rng = np.random.default_rng([cfg.train.seed, epoch, rank, 1])
        torch.manual_seed(cfg.train.seed * 100003 + epoch * 101 + rank)
        start = time.perf_counter()
        stats = run_epoch(
            loss_fn, optimizer, scheduler, data, cfg, steps, rng, device, balancer, epoch * steps,
            on_step=tracker.stepper(epoch + 1),
        )
        elapsed = time.perf_counter() - start
        metrics = {"epoch": epoch + 1, **stats, "lr": scheduler.get_last_lr()[0]}
        metrics["samples_per_s"] = steps * cfg.train.batch_size * world / max(elapsed, 1e-9)
        metrics["epoch_time_s"] = elapsed
        for t, w in zip(inner.tasks, (inner.alpha * inner.balance).tolist(), strict=True):
            metrics[f"weight/{t}"] = w
        last = epoch + 1 == cfg.train.epochs
        if (epoch + 1) % cfg.train.eval_every and not last:
            tracker.epoch(metrics)
            ray.train.report(metrics)
            continue
        metrics.update(_validate(inner.model, valid, cfg, rank, world, device))
        if loop_cfg.get("objective"):
            metrics["objective"] = weighted_objective(metrics, loop_cfg["objective"])
        stop = early_stopping(state, metrics[SCORE], epoch + 1, cfg.train.patience)
        metrics["best/valid/ndcg@10"] = state["best"]
        _report(metrics, inner, optimizer, scheduler, state, cfg, items, ckpt_users, data_dir, loop_cfg, rank, tracker)
        if stop:
            if rank == 0:
                log.warning("early stop at epoch %d: no better %s for %d epochs", epoch + 1, SCORE, cfg.train.patience)
            break
    tracker.close()


def newer_checkpoint_on_disk(run_dir: str | None, registered) -> str | None:
    """A complete checkpoint in the run directory newer than the one Ray Train hands back, if any.

    A rank that dies just after a checkpoint was written can fail the worker group before Ray's
    controller has registered that checkpoint; the restart would then repeat its epochs. Checkpoint
    directories whose files match meta.json's checksums are complete (a copy cut short is not).
    """
    from p5ray.errors import CheckpointError

    if not run_dir or "://" in run_dir:
        return None
    registered_epoch = -1
    if registered is not None:
        with registered.as_directory() as d:
            registered_epoch = int(ckpt.read_meta(d).get("epoch", -1))
    for path in sorted(Path(run_dir).glob("checkpoint_epoch_*"), reverse=True):
        try:
            meta = ckpt.read_meta(path)
            if int(meta.get("epoch", -1)) <= registered_epoch:
                return None
            ckpt.verify(path, meta)
        except (CheckpointError, ValueError):
            continue
        if "train_state.pt" in meta["sha256"]:
            return str(path)
    return None


def weighted_objective(metrics: dict, weights: dict[str, float]) -> float:
    """sum_k w_k * metrics[k]: one number that ranks epochs and trials by several metrics."""
    return float(sum(w * metrics[k] for k, w in weights.items()))


def _report(metrics, inner, optimizer, scheduler, state, cfg, items, users, data_dir, loop_cfg, rank, tracker) -> None:
    import ray.train

    tracker.epoch(metrics)  # rank 0: history, progress line on the driver, TensorBoard, MLflow
    if rank != 0:
        ray.train.report(metrics)
        return
    train_state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "balance": inner.balance.detach().cpu(),
        "log_vars": inner.log_vars.detach().cpu(),
        **state,
    }
    meta = {
        "epoch": metrics["epoch"],
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
        "data_dir": str(data_dir),
        "run_name": loop_cfg.get("run_name"),
        "tasks": list(inner.tasks),
        "has_ratings": "rating" in inner.tasks,
        "rating_min": loop_cfg.get("rating_min"),
        "rating_max": loop_cfg.get("rating_max"),
        **tracker.meta(),
    }
    if loop_cfg.get("init_from"):
        meta["init_from"] = loop_cfg["init_from"]
    with tempfile.TemporaryDirectory() as tmp:
        path = ckpt.save(Path(tmp) / "ckpt", inner.model, from_dict(loop_cfg["config"]), items, users, meta, train_state)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(path)),
            checkpoint_dir_name=f"checkpoint_epoch_{metrics['epoch']:04d}",
        )


# -- the driver -----------------------------------------------------------------------------


@dataclass
class FitResult:
    checkpoint: str  # the best checkpoint by valid/ndcg@10
    metrics: dict  # its reported metrics
    run_dir: str
    report: str | None = None  # RUN_DIR/report.md


def fit(
    data_dir: str,
    cfg: Config,
    storage: str = "runs",
    name: str | None = None,
    resume: bool = False,
    init_from: str | None = None,
    mlflow_uri: str | None = None,
) -> FitResult:
    """Train with Ray Train on cfg.train.num_workers workers; return the best checkpoint.

    Rank 0 also writes TensorBoard event files (and MLflow records with `mlflow_uri`) and sends
    progress to this driver, which prints it; the run's report.md and plots are written at the end.
    """
    from p5ray.errors import OutputExistsError, P5RayError, UserError
    from p5ray.progress import ProgressPrinter
    from p5ray.raycluster import (
        check_shared_storage,
        cluster_address_for_train,
        ensure_ray,
        storage_path,
    )
    from p5ray.tracking import require_mlflow

    data_dir = str(dataset.check_data_dir(data_dir).resolve())
    manifest = dataset.read_manifest(data_dir)
    storage = storage_path(storage)
    name = name or time.strftime("train-%Y%m%d-%H%M%S")
    run_dir = os.path.join(storage, name)
    exists = os.path.exists(run_dir) if "://" not in storage else False
    if exists and not resume:
        raise OutputExistsError(f"run {run_dir} already exists", "pass --resume to continue it, or another --name")
    if resume and not exists and "://" not in storage:
        raise UserError(f"--resume: no run at {run_dir}", "give the --storage and --name of the run to continue")
    if resume and exists:
        check_resume_fits(run_dir, data_dir)
    if init_from:
        from p5ray.warmstart import check_init_from

        init_from = str(Path(init_from).resolve())
        check_init_from(init_from, cfg.model.dim)
    if mlflow_uri:
        require_mlflow()
    ensure_ray(cfg.train.num_workers * cfg.train.cpus_per_worker)
    check_shared_storage(storage)  # multi-node: every node must see a local --storage path
    progress = ProgressPrinter.start()
    tracking = {"run_dir": run_dir, "progress": progress.queue, "mlflow_uri": mlflow_uri}
    trainer = build_trainer(data_dir, cfg, storage, name, init_from=init_from, manifest=manifest,
                            run_dir=run_dir, tracking=tracking)
    try:
        with cluster_address_for_train():
            result = trainer.fit()
    except Exception as exc:
        raise P5RayError(f"training failed: {failure_line(exc)}") from exc
    finally:
        progress.stop()
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if SCORE in m]
    if not scored:
        raise P5RayError("training finished without a validated checkpoint")
    best_ckpt, best_metrics = max(scored, key=lambda cm: cm[1][SCORE])
    return FitResult(best_ckpt.path, dict(best_metrics), run_dir, _write_report(run_dir))


def _write_report(run_dir: str) -> str | None:
    """RUN_DIR/report.md and its plots; a report that cannot be written never fails the run."""
    from p5ray import report

    if "://" in run_dir:  # s3://, gs://: copy the run down and run `p5ray report` on the copy
        log.info("run report: not written on remote storage %s; `p5ray report` a local copy", run_dir)
        return None
    try:
        return str(report.write_run_report(run_dir))
    except Exception as exc:
        log.warning("no run report (%s: %s); try `p5ray report %s`", type(exc).__name__, exc, run_dir)
        return None


def build_trainer(
    data_dir: str,
    cfg: Config,
    storage: str,
    name: str,
    init_from: str | None = None,
    manifest: dict | None = None,
    callbacks: list | None = None,
    objective: dict[str, float] | None = None,
    score: str = SCORE,
    score_order: str = "max",
    resume_from: str | None = None,
    keep_all: bool = False,
    run_dir: str | None = None,
    tracking: dict | None = None,
):
    """Ray Data datasets + a TorchTrainer running train_loop_per_worker (used by fit() and tune).

    `objective` (metric -> weight) makes every validated epoch also report `objective`, their
    weighted sum; `score` names the reported metric that ranks the kept checkpoints.
    `resume_from` starts from that checkpoint's full state (Tune PBT); `keep_all` keeps every
    checkpoint (PBT copies the latest one of another trial). `run_dir` (a local run directory of
    `fit`) lets a restart use a checkpoint written there that Ray had not registered yet.
    `tracking` (run_dir, progress queue, mlflow_uri) reaches rank 0's RunTracker (p5ray/tracking.py).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from p5ray.raycluster import train_logging_config, verbose, worker_plan

    manifest = manifest or dataset.read_manifest(data_dir)
    plan = worker_plan(cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.use_gpu)
    train_ds = ray.data.read_parquet(os.path.join(data_dir, "train.parquet")).map_batches(
        dataset.explode_windows, fn_kwargs={"max_len": cfg.model.max_len}, batch_format="numpy"
    )
    if plan.read_first:  # no CPU to spare for streaming once the workers hold theirs
        train_ds = train_ds.materialize()
    # every worker reads the whole valid split: read it once, now, rather than once per worker
    # while the workers hold their CPUs (on a small cluster those reads would wait for CPUs)
    valid_ds = ray.data.read_parquet(
        os.path.join(data_dir, "valid.parquet"), columns=["user_idx", "history", "target"]
    ).materialize()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(cfg), "data_dir": data_dir, "init_from": init_from, "run_name": name,
            "verbose": verbose(), "rating_min": manifest.get("rating_min"), "rating_max": manifest.get("rating_max"),
            "objective": objective, "resume_from": resume_from,
            "fault": faults.spec_from_env(),  # None unless a test injects one
            **(tracking or {}), "run_dir": run_dir or (tracking or {}).get("run_dir"),
        },
        torch_config=TorchConfig(backend=torch_backend(cfg.train.use_gpu)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=plan.resources_per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=None if keep_all else cfg.train.keep_checkpoints + 1,
                checkpoint_score_attribute=score,
                checkpoint_score_order=score_order,
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=train_logging_config(),
            callbacks=callbacks or None,
        ),
        datasets={"train": train_ds, "valid": valid_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def check_resume_fits(run_dir: str, data_dir: str) -> None:
    """--resume on other data than the run's: refused before any worker starts (exit 2)."""
    from p5ray.errors import CheckpointError

    latest = sorted(Path(run_dir).glob("checkpoint_epoch_*"))
    if not latest:
        return
    meta = ckpt.read_meta(latest[-1])
    users = dataset.read_table(data_dir, "users.parquet")
    if not ckpt.fits_data(meta, dataset.read_table(data_dir, "items.parquet"), users):
        raise CheckpointError(
            f"--resume: run {run_dir} was trained on other data than {data_dir} (the id vocabularies differ)",
            f"resume with --data {meta.get('data_dir', 'of the run')}, or start a new run with --init-from {latest[-1]}",
        )


def failure_line(exc: BaseException) -> str:
    """The original error of a training failure and the rank it happened on, on one line."""
    seen: BaseException | None = exc
    while seen is not None and not getattr(seen, "worker_failures", None):
        seen = seen.__cause__
    if seen is None:  # not a worker failure (the controller, the driver): the innermost error
        return _root_cause(exc)
    failures = seen.worker_failures  # ray.train.WorkerGroupError: world rank -> its exception
    first = min(failures)
    others = sorted(set(failures) - {first})
    also = f" (also failed: rank {', '.join(map(str, others))})" if others else ""
    return f"rank {first}: {_root_cause(failures[first])}{also}"


def _root_cause(exc: BaseException) -> str:
    """The innermost error message of a (Ray-wrapped) training failure, on one line."""
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}"
