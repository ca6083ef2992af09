"""`p5ray batch-recommend`: offline top-K for every (listed) user with Ray Data.

    users (data dir's users.parquet, or --users) -> Ray Data blocks of `batch_size` users
      -> map_batches(TopK, ActorPoolStrategy(num_workers))   the checkpoint loaded once per actor
           recommend_users(core, ids, k)                     plain function: the serving core's
                                                             recall_many -> rank -> top k
      -> streamed to the driver, progress logged -> Parquet under a temporary name -> renamed

A user's rows equal the `items` of `POST /v1/recommend {"user_id": u, "k": K}` on the same
checkpoint: the same core methods in the same order (recall max(K, 100) over the whole catalog in
chunks, seen items masked, then rank), only batched across users for the recall. `--cross-sell`
adds, per item, the answer of `POST /v1/cross-sell {"item_ids": [item], "k": K}`.

Output (Parquet; one file if --out ends in .parquet, else a directory of part files):
    recommendations   user_id string, rank int32 (1 = best), item_id string, score float32
    cross-sell        item_id string, rank int32, cross_sell_item_id string, score float32
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from p5ray import checkpoint as ckpt
from p5ray import dataset
from p5ray.errors import CheckpointError, P5RayError, UserError
from p5ray.hardware import check_gpus
from p5ray.ingest import outputs
from p5ray.schemas import CANDIDATES, MAX_K

log = logging.getLogger("p5ray.batch")

RECOMMENDATIONS = pa.schema([
    ("user_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()), ("score", pa.float32()),
])
CROSS_SELL = pa.schema([
    ("item_id", pa.string()), ("rank", pa.int32()), ("cross_sell_item_id", pa.string()), ("score", pa.float32()),
])
ROWS_PER_FILE = 1 << 20  # part files of a directory output
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class BatchOptions:
    checkpoint: str
    data: str
    out: str
    k: int = 50
    users: str | None = None  # a file of raw user ids (one a line, or a Parquet user_id column)
    num_workers: int = 1
    use_gpu: bool = False
    cross_sell: bool = False
    overwrite: bool = False
    batch_size: int = 256  # users per map batch (and per block)
    chunk_items: int = 65536  # catalog chunk of the full scoring: memory ~ batch_size x chunk_items
    cpus_per_worker: int = 1  # logical CPUs reserved and torch threads per actor


# -- plain functions on a batch (no Ray) ------------------------------------------------------


def recommend_users(core, user_ids: Sequence[str], k: int) -> pa.Table:
    """RECOMMENDATIONS rows of these users: `Recommender.recommend`'s items, recall batched."""
    recalled = core.recall_many([(u, None, max(k, CANDIDATES)) for u in user_ids])
    cols: dict[str, list] = {name: [] for name in RECOMMENDATIONS.names}
    for user, answer in zip(user_ids, recalled, strict=True):
        items = answer.items
        if not answer.cold_start and "rank" in core.tasks and items:
            items = core.rank(user, None, [i for i, _ in items]).items
        items = items[:k]
        check_unseen(core, user, items)
        cols["user_id"] += [user] * len(items)
        cols["rank"] += range(1, len(items) + 1)
        cols["item_id"] += [i for i, _ in items]
        cols["score"] += [s for _, s in items]
    return pa.table(cols, schema=RECOMMENDATIONS)


def check_unseen(core, user: str, items: Sequence[tuple[str, float]]) -> None:
    """No item of the user's stored history may be recommended (the serving mask, checked)."""
    seen = core.histories.get(core.user_index.get(user, 0))
    if seen is None or not len(seen):
        return
    hit = np.isin([core.item_index[i] for i, _ in items], seen)
    if hit.any():
        raise P5RayError(f"user {user!r}: recommended item {items[int(np.argmax(hit))][0]!r} is in the user's history")


def cross_sell_items(core, item_ids: Sequence[str], k: int) -> pa.Table:
    """CROSS_SELL rows: per item, the core's cross_sell([item], k) (POST /v1/cross-sell)."""
    cols: dict[str, list] = {name: [] for name in CROSS_SELL.names}
    for item in item_ids:
        items = core.cross_sell([item], k).items
        cols["item_id"] += [item] * len(items)
        cols["rank"] += range(1, len(items) + 1)
        cols["cross_sell_item_id"] += [i for i, _ in items]
        cols["score"] += [s for _, s in items]
    return pa.table(cols, schema=CROSS_SELL)


class TopK:
    """The map_batches callable: one serving core per actor, reused for every batch."""

    def __init__(self, checkpoint: str, k: int, task: str = "recommend", device: str = "cpu",
                 chunk_items: int = 65536, threads: int = 1):
        import torch

        from p5ray.inference import Recommender

        torch.set_num_threads(threads)
        self.core = Recommender(checkpoint, device=device, chunk_items=chunk_items)
        self.k = k
        self.fn = recommend_users if task == "recommend" else cross_sell_items
        self.column = "user_id" if task == "recommend" else "item_id"

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.fn(self.core, batch.column(self.column).to_pylist(), self.k)


# -- checks before any Ray starts ----------------------------------------------------------------


def read_user_list(path: str) -> list[str]:
    """Raw user ids from a text file (one a line, blank lines skipped) or a Parquet `user_id` column."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--users {path} does not exist", "give a file with one user id a line")
    if file.suffix == ".parquet":
        table = pq.read_table(file)
        if "user_id" not in table.column_names:
            raise UserError(f"--users {path} has no user_id column")
        ids = [str(u) for u in table.column("user_id").to_pylist() if u is not None]
    else:
        ids = [line.rstrip("\r\n") for line in file.read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(i for i in ids if i.strip()))


def select_users(known: pa.Table, listed: list[str] | None) -> tuple[list[str], list[str]]:
    """(user ids to score in index order, listed ids the vocab does not know)."""
    ids = known.column("user_id").to_pylist()
    if listed is None:
        return ids, []
    wanted = set(listed)
    index = set(ids)
    return [u for u in ids if u in wanted], [u for u in listed if u not in index]


def check_fits(meta: dict, checkpoint: str, data_dir: str) -> tuple[pa.Table, pa.Table]:
    """The data directory's (items, users) when the checkpoint was trained on this vocab and
    its users.parquet histories hold every interaction of the data (so the mask is complete)."""
    items = dataset.read_table(data_dir, "items.parquet")
    users = dataset.read_table(data_dir, "users.parquet")
    if ckpt.vocab_fingerprint(items, users.select(["user_idx", "user_id"])) != meta.get("vocab_fingerprint"):
        raise CheckpointError(
            f"checkpoint {checkpoint} was trained on other data than {data_dir} (the id vocabularies differ)",
            "pass the data directory the checkpoint was trained on, or train on this one (train --init-from keeps what was learnt)",
        )
    if "n_interactions" in users.column_names:
        stored = pq.read_table(Path(checkpoint) / "users.parquet", columns=["user_idx", "history"])
        lengths = np.zeros(len(users) + 1, np.int64)
        lengths[stored.column("user_idx").to_numpy()] = pc.list_value_length(stored.column("history")).fill_null(0).to_numpy()
        counts = users.column("n_interactions").to_numpy()
        differ = np.flatnonzero(lengths[users.column("user_idx").to_numpy()] != counts)
        if len(differ):
            user = users.column("user_id")[int(differ[0])].as_py()
            raise CheckpointError(
                f"{data_dir} has interactions checkpoint {checkpoint} does not hold ({len(differ)} users differ, e.g. {user!r})",
                "recommend with the data the checkpoint was trained on, or train on this data first",
            )
    return items, users


def output_paths(opts: BatchOptions) -> tuple[Path, Path | None]:
    """--out, and the cross-sell output beside it: X.parquet -> X.cross_sell.parquet, DIR -> DIR.cross_sell."""
    out = Path(opts.out).resolve()
    if not opts.cross_sell:
        return out, None
    if out.suffix == ".parquet":
        return out, out.with_name(out.stem + ".cross_sell.parquet")
    return out, out.with_name(out.name + ".cross_sell")


def check_options(opts: BatchOptions) -> dict:
    """Every usage check, before Ray starts; returns the checkpoint's meta."""
    if not 1 <= opts.k <= MAX_K:
        raise UserError(f"--k {opts.k}: expected 1 to {MAX_K}")
    for flag, value in (("--num-workers", opts.num_workers), ("--batch-size", opts.batch_size),
                        ("--chunk-items", opts.chunk_items), ("--cpus-per-worker", opts.cpus_per_worker)):
        if value < 1:
            raise UserError(f"{flag} {value}: expected 1 or more")
    meta = ckpt.read_meta(opts.checkpoint)
    ckpt.verify(opts.checkpoint, meta)
    dataset.check_data_dir(opts.data)
    if opts.cross_sell and "cross_sell" not in meta.get("spec", {}).get("tasks", ()):
        raise UserError(f"--cross-sell: checkpoint {opts.checkpoint} was not trained for the cross_sell task")
    for path in output_paths(opts):
        if path is not None:
            outputs.check_out(path, opts.overwrite, [opts.checkpoint, opts.data])
    return meta


# -- the Ray Data job ----------------------------------------------------------------------------


def run(opts: BatchOptions) -> dict:
    """Write the recommendations (and cross-sell lists) of opts; returns a summary."""
    meta = check_options(opts)
    items, users = check_fits(meta, opts.checkpoint, opts.data)
    listed = read_user_list(opts.users) if opts.users else None
    user_ids, unknown = select_users(users, listed)
    if unknown:
        log.warning("%d listed user ids are not in %s and are left out: %s", len(unknown), opts.data, ", ".join(unknown[:10]))
    if not user_ids:
        raise UserError(f"none of the {len(listed or [])} listed users is known to {opts.data}", "list raw user ids, one a line")
    out, cross_out = output_paths(opts)
    summary = {"users": len(user_ids), "unknown_users": len(unknown), "k": opts.k,
               "model_version": meta.get("model_version"), "out": str(out)}
    with ray_session(opts):
        done = write_output(score(user_ids, "recommend", opts), out, RECOMMENDATIONS, opts.overwrite, len(user_ids), "users")
        summary.update(rows=done.rows, **done.rates())
        log.info("batch-recommend: %d users, %d rows in %.1f s: %.1f users/s (%d worker(s))",
                 len(user_ids), done.rows, summary["elapsed_s"], summary["users_per_s"], opts.num_workers)
        if cross_out is not None:
            item_ids = items.column("item_id").to_pylist()
            crossed = write_output(score(item_ids, "cross_sell", opts), cross_out, CROSS_SELL, opts.overwrite, len(item_ids), "items")
            summary.update(cross_sell_rows=crossed.rows, cross_sell_out=str(cross_out))
    return summary


@contextmanager
def ray_session(opts: BatchOptions):
    """Join or start Ray with room for the actors; shut it down after if it was started here."""
    import ray

    from p5ray.raycluster import ensure_ray

    started = not ray.is_initialized()
    ensure_ray(opts.num_workers * opts.cpus_per_worker)
    try:
        # one GPU an actor: fewer would leave the pool waiting
        problem = check_gpus(opts.num_workers, opts.use_gpu, ray.cluster_resources().get("GPU", 0))
        if problem:
            raise UserError(problem, "drop --use-gpu, lower --num-workers, or connect to a cluster with GPUs (RAY_ADDRESS)")
        yield
    finally:
        if started:
            ray.shutdown()


def score(ids: list[str], task: str, opts: BatchOptions) -> Iterable[pa.Table]:
    """Blocks of `batch_size` ids -> TopK on an actor pool -> result batches in input order."""
    import ray

    column = "user_id" if task == "recommend" else "item_id"
    blocks = [pa.table({column: pa.array(ids[i:i + opts.batch_size], pa.string())}) for i in range(0, len(ids), opts.batch_size)]
    ds = ray.data.from_arrow(blocks).map_batches(
        TopK,
        fn_constructor_kwargs={
            "checkpoint": str(Path(opts.checkpoint).resolve()), "k": opts.k, "task": task,
            "device": "cuda" if opts.use_gpu else "cpu", "chunk_items": opts.chunk_items, "threads": opts.cpus_per_worker,
        },
        batch_size=opts.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=opts.num_workers),
        num_cpus=opts.cpus_per_worker,
        num_gpus=1 if opts.use_gpu else 0,
    )
    ds.context.execution_options.preserve_order = True  # the output follows the users' index order
    return ds.iter_batches(batch_size=None, batch_format="pyarrow")


def write_output(batches: Iterable[pa.Table], out: Path, schema: pa.Schema, overwrite: bool, total: int, noun: str) -> Progress:
    """Stream batches into Parquet under a temporary name beside `out`, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    (tmp / "out").mkdir(parents=True)
    try:
        single = out.suffix == ".parquet"  # one file: never rolled over, or rows would be left behind
        parts = PartWriter(tmp / "out", schema, rows_per_file=None if single else ROWS_PER_FILE)
        progress = Progress(total, noun)
        for batch in batches:
            parts.write(batch)
            progress.update(pc.count_distinct(batch.column(0)).as_py(), batch.num_rows)
        parts.close()
        progress.done()
        staged = parts.files[0] if single else tmp / "out"
        outputs.publish(staged, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return progress


class PartWriter:
    """Parquet part files of at most `rows_per_file` rows each (None: one file): part-00000.parquet, ..."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_file: int | None = ROWS_PER_FILE):
        self.directory, self.schema, self.rows_per_file = directory, schema, rows_per_file
        self.files: list[Path] = []
        self.rows = 0
        self._sink: outputs.ParquetSink | None = None
        self._in_file = 0

    def write(self, table: pa.Table) -> None:
        if self._sink is None or (self.rows_per_file is not None and self._in_file >= self.rows_per_file):
            self._next()
        self._sink.write(table)
        self._in_file += table.num_rows
        self.rows += table.num_rows

    def _next(self) -> None:
        if self._sink is not None:
            self._sink.close()
        self.files.append(self.directory / f"part-{len(self.files):05d}.parquet")
        self._sink = outputs.ParquetSink(self.files[-1], self.schema)
        self._in_file = 0

    def close(self) -> None:
        if self._sink is None:
            self._next()
        self._sink.close()


class Progress:
    """`N/TOTAL users (P%), R rows, X users/s` on the log every few seconds, and at the end."""

    def __init__(self, total: int, noun: str):
        self.total, self.noun = total, noun
        self.count = self.rows = 0
        self.start = self.last = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (seconds, count) when the first batch arrived
        self.end = self.start

    def update(self, count: int, rows: int) -> None:
        self.count += count
        self.rows += rows
        now = time.perf_counter()
        if self.first is None:
            self.first = (now - self.start, self.count)
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            self._log(now)

    def _log(self, now: float) -> None:
        rate = self.count / max(now - self.start, 1e-9)
        log.info("%d/%d %s (%.0f%%), %d rows, %.1f %s/s", self.count, self.total, self.noun,
                 100 * self.count / max(self.total, 1), self.rows, rate, self.noun)

    def done(self) -> None:
        self.end = time.perf_counter()
        self._log(self.end)

    def rates(self) -> dict:
        """Throughput over the whole run, and after the first batch (actors started, model loaded)."""
        elapsed = self.end - self.start
        first_s, first_n = self.first or (elapsed, self.count)
        steady = (self.count - first_n) / (elapsed - first_s) if elapsed > first_s and self.count > first_n else 0.0
        return {"elapsed_s": round(elapsed, 2), f"{self.noun}_per_s": round(self.count / max(elapsed, 1e-9), 1),
                "first_batch_s": round(first_s, 2), f"steady_{self.noun}_per_s": round(steady, 1)}
