"""Batch-recommend throughput: users/s of `p5ray batch-recommend` with 1 and 2 workers.

    python bench/batch_throughput.py --data PREPARED_BEAUTY                  # untrained checkpoint
    python bench/batch_throughput.py --data PREPARED_BEAUTY --checkpoint CKPT --users 4096
    python bench/batch_throughput.py --markdown bench/batch_throughput.json

Without --checkpoint the model is untrained but real: the default model config (dim 64, 2
layers, window 50) over the data directory's own vocab, features and histories (so it passes
batch-recommend's fit checks); scoring cost depends on shapes, not weight values. Each worker
count is one `batch.run` (the CLI's code) in one local Ray started beforehand; reported: users/s
over the whole run (actor start included) and after the first result batch (steady state).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def user_subset(data: str, n: int | None, path: Path) -> str | None:
    """The first n users of the data directory as a --users file (None: every user)."""
    if not n:
        return None
    import pyarrow.parquet as pq

    ids = pq.read_table(Path(data) / "users.parquet", columns=["user_id"]).column("user_id").to_pylist()[:n]
    path.write_text("".join(f"{u}\n" for u in ids))
    return str(path)


def measure(checkpoint: str, data: str, workers: list[int], k: int, users: str | None, batch_size: int, work: Path) -> list[dict]:
    from p5ray import batch

    rows = []
    for n in workers:
        opts = batch.BatchOptions(checkpoint, data, str(work / f"top{k}-w{n}.parquet"), k=k, users=users,
                                  num_workers=n, batch_size=batch_size, overwrite=True)
        summary = batch.run(opts)
        rows.append({"workers": n, **{key: summary[key] for key in ("users", "rows", "elapsed_s", "users_per_s",
                                                                     "first_batch_s", "steady_users_per_s")}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = ["| workers | users | rows | wall s | users/s (all) | first batch s | users/s (after first batch) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['workers']} | {r['users']} | {r['rows']} | {r['elapsed_s']:.1f} | {r['users_per_s']:.1f} "
                     f"| {r['first_batch_s']:.1f} | {r['steady_users_per_s']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="prepared Beauty directory (p5ray prepare --format sequence)")
    parser.add_argument("--checkpoint", help="a checkpoint trained on --data (default: an untrained one)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--users", type=int, help="only the first N users (a brief run)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "bench" / "batch_throughput.json"))
    parser.add_argument("--markdown", metavar="JSON", help="print the table of an earlier result and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if not args.data:
        parser.error("--data is required")
    from p5ray.raycluster import ensure_ray
    from tests.helpers import start_local_ray
    from tests.helpers_batch import checkpoint_for_data

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint or str(checkpoint_for_data(args.data, work / "ckpt"))
        start_local_ray(num_cpus=max(os.cpu_count() or 1, max(args.workers) + 2))
        ensure_ray()
        started, load_before = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()
        runs = measure(checkpoint, args.data, args.workers, args.k, user_subset(args.data, args.users, work / "users.txt"),
                       args.batch_size, work)
    result = {"date": started, "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
              "load_average_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)], "checkpoint": args.checkpoint or "untrained, default model config",
              "data": args.data, "k": args.k, "batch_size": args.batch_size, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
