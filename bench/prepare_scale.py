"""Scale bench of `p5ray prepare`: wall time, rows/s and whole-run memory at 1M / 5M / 20M rows.

    python bench/prepare_scale.py                    # 1M, 5M, 20M; writes a BENCHMARKS.md section
    python bench/prepare_scale.py --rows 1M --no-md  # one size, print only

Logs are built by replicating MovieLens-100K (`data/ml-100k/u.data`) with id offsets (copy k:
user + 1000 k, item + 2000 k, same timestamps), so the shape of the data stays real. Each log is
prepared twice, each time in a fresh process: by `p5ray prepare` (Ray Data, local Ray started
by the command) and by `baseline` below, a plain single-process pandas implementation of the
same steps (read, validate, de-duplicate, number ids with the same keyed hash, order by
(timestamp, line), leave-one-out, cross-sell pairs, Parquet). Memory is the peak, over samples
every 0.25 s, of the summed PSS (proportional set size: shared pages such as Ray's object store
counted once) of the command and every process under it (Ray's GCS, raylet, workers), plus what
Ray spilled to disk is not memory and is not counted.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"1M": 10, "5M": 50, "20M": 200}  # copies of the 100,000 MovieLens rows


def build_log(path: Path, copies: int) -> int:
    """`copies` shifted copies of ML-100K u.data as one tab-separated log; returns its rows."""
    lines = (ROOT / "data" / "ml-100k" / "u.data").read_text().splitlines()
    rows = [ln.split("\t") for ln in lines]
    with open(path, "w") as f:
        for k in range(copies):
            f.write(
                "".join(
                    f"{int(u) + 1000 * k}\t{int(i) + 2000 * k}\t{r}\t{t}\n" for u, i, r, t in rows
                )
            )
    return len(rows) * copies


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_pss_bytes(root: int) -> int:
    """Summed PSS of a process and all its descendants."""
    kids, total, todo = _children(), 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        match = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
        total += int(match.group(1)) * 1024 if match else 0
    return total


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command; wall time and peak whole-tree PSS."""
    start, load = time.time(), os.getloadavg()[0]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss_bytes(proc.pid))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()[-2000:]}")
    return {"wall_s": time.time() - start, "peak_bytes": peak[0], "stdout": out, "load": load}


def baseline(log: str, out: str) -> None:
    """The same steps as `p5ray prepare`, single process, pandas (+ numpy/pyarrow for lists)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from p5ray import events, vocab

    df = pd.read_csv(
        log, sep="\t", names=["u", "i", "r", "t"], dtype=str, header=None, keep_default_na=False
    )
    df["line"] = np.arange(1, len(df) + 1)
    rating, ts = pd.to_numeric(df["r"], errors="coerce"), pd.to_numeric(df["t"], errors="coerce")
    bad = (
        rating.isna() | ts.isna() | df["u"].eq("") | df["i"].eq("") | (rating < 0.5) | (rating > 5)
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    df[bad].to_csv(Path(out) / "quarantine.csv", index=False)
    df = df[~bad].assign(r=rating[~bad].astype("float32"), t=ts[~bad].astype("int64"))
    df = df.drop_duplicates(["u", "i", "t", "r"]).sort_values(["u", "t", "line"], kind="stable")
    users = vocab.assign(df["u"].unique(), vocab.DEFAULT_SEED)
    items = vocab.assign(df["i"].unique(), vocab.DEFAULT_SEED)
    df["user_idx"] = pd.Index(users).get_indexer(df["u"]) + 1
    df["item_idx"] = pd.Index(items).get_indexer(df["i"]) + 1
    df = df.sort_values(["user_idx", "t", "line"], kind="stable")
    n = df.groupby("user_idx", sort=False)["item_idx"].size()
    offsets = pa.array(np.concatenate([[0], np.cumsum(n.to_numpy())]).astype(np.int32))
    seq = pa.table(
        {
            "user_idx": pa.array(n.index.to_numpy(), pa.int32()),
            "items": pa.ListArray.from_arrays(
                offsets, pa.array(df["item_idx"].to_numpy(), pa.int32())
            ),
            "timestamps": pa.ListArray.from_arrays(offsets, pa.array(df["t"].to_numpy())),
            "ratings": pa.ListArray.from_arrays(offsets, pa.array(df["r"].to_numpy())),
            "events": pa.nulls(len(n), pa.list_(pa.string())),
        }
    )
    train, valid, test = events.split_leave_one_out(seq)
    for name, table in (("sequences", seq), ("train", train), ("valid", valid), ("test", test)):
        pq.write_table(table, Path(out) / f"{name}.parquet")
    pairs = events.pair_counts(seq, None)
    merged = pa.concat_tables([events.PAIRS.empty_table(), *events.merge_sorted_counts([pairs])])
    pq.write_table(merged, Path(out) / "cross_sell.parquet")
    counts = np.bincount(pc_flat(train), minlength=len(items) + 1)
    pq.write_table(
        pa.table(
            {
                "item_idx": pa.array(np.arange(1, len(items) + 1), pa.int32()),
                "item_id": items,
                "train_count": counts[1:],
            }
        ),
        Path(out) / "items.parquet",
    )
    pq.write_table(
        pa.table(
            {"user_idx": pa.array(np.arange(1, len(users) + 1), pa.int32()), "user_id": users}
        ),
        Path(out) / "users.parquet",
    )
    print(f"baseline: {len(users)} users, {len(items)} items, {len(df)} interactions")


def pc_flat(train):
    import pyarrow.compute as pc

    return pc.list_flatten(train["items"]).to_numpy()


def run_size(label: str, copies: int, work: Path, skip_pandas: bool) -> dict:
    log = work / f"log-{label}.data"
    rows = build_log(log, copies)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ray_cmd = [
        sys.executable,
        "-m",
        "p5ray.cli",
        "prepare",
        "--input",
        str(log),
        "--format",
        "movielens",
        "--out",
        str(work / f"out-{label}"),
        "--overwrite",
        "--quiet",
    ]
    for attempt in range(3):  # on an oversubscribed machine a local Ray may miss its 30 s start
        try:
            result = {"label": label, "rows": rows, "ray": measure(ray_cmd, env)}
            break
        except RuntimeError as exc:
            if "could not start a local Ray" not in str(exc) or attempt == 2:
                raise
            print(f"{label}: Ray did not start, retrying", flush=True)
    if not skip_pandas:
        result["pandas"] = measure(
            [sys.executable, __file__, "--baseline", str(log), str(work / f"base-{label}")], env
        )
    log.unlink()
    print(row_text(result), flush=True)
    return result


def row_text(r: dict) -> str:
    def cell(m):
        rate = r["rows"] / m["wall_s"] / 1e3
        return f"{m['wall_s']:.0f} s | {rate:.0f}k | {m['peak_bytes'] / 2**30:.2f} GiB | {m['load']:.0f}"

    pandas = cell(r["pandas"]) if "pandas" in r else "- | - | - | -"
    ratio = f"{r['ray']['wall_s'] / r['pandas']['wall_s']:.2f}x" if "pandas" in r else "-"
    return f"| {r['label']} | {cell(r['ray'])} | {pandas} | {ratio} |"


def write_markdown(results: list[dict], path: Path) -> None:
    cpus = os.cpu_count()
    section = "\n".join(
        [
            "## prepare: scale (bench/prepare_scale.py)",
            "",
            f"MovieLens-100K replicated with id offsets; `p5ray prepare` on a local Ray vs a plain single-process "
            f"pandas implementation of the same steps; {cpus} CPU cores (shared), {time.strftime('%Y-%m-%d')}. "
            "Memory: peak summed PSS of the command's whole process tree (driver, GCS, raylet, Ray workers; "
            "the object store's shared pages counted once). `load`: the machine's 1-minute load average when "
            "the run started (other people's jobs share these cores; above 2 the cores were oversubscribed).",
            "",
            "| rows | Ray Data: wall | rows/s | peak memory | load | pandas: wall | rows/s | peak memory | load "
            "| Ray / pandas wall |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *(row_text(r) for r in results),
            "",
        ]
    )
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    text = (
        re.sub(r"## prepare: scale.*?(?=\n## |\Z)", "", text, flags=re.S).rstrip()
        + "\n\n"
        + section
    )
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows", default="1M,5M,20M", help="comma-separated sizes among " + ", ".join(SIZES)
    )
    parser.add_argument(
        "--work", default="/tmp/p5ray-prepare-scale", help="scratch directory (logs, outputs)"
    )
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument(
        "--no-md", action="store_true", help="print only, leave BENCHMARKS.md alone"
    )
    parser.add_argument("--skip-pandas", action="store_true")
    parser.add_argument("--baseline", nargs=2, metavar=("LOG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        baseline(*args.baseline)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = [
        run_size(label, SIZES[label], work, args.skip_pandas) for label in args.rows.split(",")
    ]
    if not args.no_md:
        write_markdown(results, Path(args.markdown))


if __name__ == "__main__":
    main()
