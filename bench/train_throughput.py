"""Training throughput: Ray Train (1 worker, then 2) against a plain PyTorch loop, one run.

    python bench/train_throughput.py --data PREPARED_DIR [--config configs/beauty.yaml] [--steps 60]

All three measure the same thing: `p5ray.train.run_epoch` (collate + forward + backward + step)
over the same model, data and torch thread count per process, timed inside the process after a
warm-up epoch, so the ratios show what Ray Train itself costs (and what a second worker adds).
Samples are training windows (sequences); 2 workers count both workers' samples.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from p5ray import dataset, train  # noqa: E402
from p5ray.config import from_dict, load_config, replace, to_dict  # noqa: E402
from p5ray.losses import MultiTaskLoss  # noqa: E402


def setup(cfg, data_dir: str, rows: dict):
    """Model, loss, optimizer and epoch data exactly as train_loop_per_worker builds them."""
    torch.manual_seed(cfg.train.seed)
    manifest = dataset.read_manifest(data_dir)
    items = dataset.read_table(data_dir, "items.parquet")
    users = dataset.read_table(data_dir, "users.parquet")
    train_table = dataset.read_table(data_dir, "train.parquet")
    spec = train.build_spec(cfg, manifest, train.training_rating_mean(train_table))
    model = train.build_model(spec, items, users)
    loss_fn = MultiTaskLoss(
        model, alpha=to_dict(cfg.loss.alpha), recall_loss=train.recall_loss_kind(cfg, spec.num_items),
        weighting=cfg.loss.weighting, logq_correction=cfg.loss.logq_correction,
        sampling_probs=train._pool_probs(items, spec.num_items),
    )
    # a canonical row order: the plain loop and a 1-worker shard then draw identical batches
    keys = [(int(u), tuple(np.asarray(s).tolist())) for u, s in zip(rows["user_idx"], rows["items"], strict=True)]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    rows = {k: v[order] for k, v in rows.items()}
    sampler = dataset.NegativeSampler(spec.num_items, np.random.default_rng(0))
    data = train.EpochData(rows, train._user_items(train_table), sampler, train._pool_probs(items, spec.num_items))
    return loss_fn, data


def timed_epochs(loss_fn, data, cfg, steps: int, rank: int = 0) -> float:
    """Samples/s of this process over `steps` steps, after one warm-up of 5 steps."""
    optimizer = train._optimizer(loss_fn, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    device = torch.device("cpu")
    train.run_epoch(loss_fn, optimizer, scheduler, data, cfg, 5, np.random.default_rng([0, rank]), device)
    start = time.perf_counter()
    train.run_epoch(loss_fn, optimizer, scheduler, data, cfg, steps, np.random.default_rng([1, rank]), device)
    return steps * cfg.train.batch_size / (time.perf_counter() - start)


def read_rows(data_dir: str, max_len: int) -> dict:
    table = dataset.read_table(data_dir, "train.parquet").to_pydict()
    batch = {k: (np.asarray(v, dtype=object) if k != "user_idx" else np.asarray(v)) for k, v in table.items()}
    rows = dataset.explode_windows(batch, max_len)
    rows["weight"] = np.ones(len(rows["items"]), np.float32)
    return rows


def plain_loop(cfg, data_dir: str, steps: int) -> float:
    torch.set_num_threads(cfg.train.threads_per_worker or cfg.train.cpus_per_worker)
    loss_fn, data = setup(cfg, data_dir, read_rows(data_dir, cfg.model.max_len))
    return timed_epochs(loss_fn, data, cfg, steps)


def plain_process(args) -> float:
    """The plain loop in a fresh process with a Ray worker's thread environment (OMP_NUM_THREADS=1):
    an OpenMP pool sized for the whole machine but used by one thread spins and loses ~2x on a
    busy 2-core machine, which would flatter Ray Train."""
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--data", args.data, "--steps", str(args.steps), "--plain-only"]
    cmd += (["--config", args.config] if args.config else []) + [f"--set={s}" for s in args.set]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["samples_per_s"])


def worker(loop_cfg: dict) -> None:
    """Ray Train worker: the real per-worker set-up (Ray Data shard, prepare_model), then timing."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(loop_cfg["config"])
    torch.set_num_threads(cfg.train.threads_per_worker or cfg.train.cpus_per_worker)
    rank = ray.train.get_context().get_world_rank()
    rows = train.collect_rows(ray.train.get_dataset_shard("train"))
    loss_fn, data = setup(cfg, loop_cfg["data_dir"], rows)
    loss_fn = ray.train.torch.prepare_model(loss_fn, parallel_strategy_kwargs={"broadcast_buffers": False})
    rate = timed_epochs(loss_fn, data, cfg, loop_cfg["steps"], rank)
    # Ray Train v2 keeps metrics only with a checkpoint: hand the number over in a file
    with open(os.path.join(loop_cfg["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"samples_per_s": rate}, f)
    ray.train.report({"samples_per_s": rate})


def ray_train(cfg, data_dir: str, steps: int, workers: int) -> float:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from p5ray.raycluster import ensure_ray, train_logging_config

    ensure_ray(workers * cfg.train.cpus_per_worker)
    out = tempfile.mkdtemp(prefix="p5ray-throughput-")
    ds = ray.data.read_parquet(os.path.join(data_dir, "train.parquet")).map_batches(
        dataset.explode_windows, fn_kwargs={"max_len": cfg.model.max_len}, batch_format="numpy"
    )
    trainer = TorchTrainer(
        worker,
        train_loop_config={"config": to_dict(cfg), "data_dir": data_dir, "steps": steps, "out": out},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=f"throughput-{workers}-{int(time.time())}", storage_path=out,
                                       logging_config=train_logging_config()),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    trainer.fit()
    # the ranks run the same step count in lockstep (DDP): their rates add up
    rates = [json.loads(open(os.path.join(out, f"rank{r}.json")).read())["samples_per_s"] for r in range(workers)]
    shutil.rmtree(out, ignore_errors=True)
    return float(sum(rates))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default=None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    data_dir = os.path.abspath(args.data)
    cfg = load_config(args.config, args.set)
    cfg = replace(cfg, train={"cpus_per_worker": 1, "threads_per_worker": 1})
    if args.plain_only:
        print(json.dumps({"samples_per_s": plain_loop(cfg, data_dir, args.steps)}))
        return
    plain = plain_process(args)
    one = ray_train(cfg, data_dir, args.steps, 1)
    two = ray_train(cfg, data_dir, args.steps, 2)
    out = {
        "plain_torch_samples_per_s": round(plain, 1),
        "ray_train_1_worker_samples_per_s": round(one, 1),
        "ray_train_2_workers_samples_per_s": round(two, 1),
        "ratio_ray1_over_plain": round(one / plain, 3),
        "ratio_ray2_over_ray1": round(two / one, 3),
        "threads_per_process": 1, "steps": args.steps, "batch_size": cfg.train.batch_size, "cpus": os.cpu_count(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
