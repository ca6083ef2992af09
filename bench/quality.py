"""Model quality benchmark: train + evaluate through the product CLI, next to published numbers.

    python bench/quality.py                       # Beauty and MovieLens-100K, full recipes
    python bench/quality.py --datasets ml-100k --recbole-python /tmp/recbole-venv/bin/python

For each data set: `p5ray prepare` (unless --data-DATASET points at a prepared directory),
`p5ray train --config configs/DATASET.yaml` (Ray Train, 2 workers), `p5ray evaluate` on the test
split; then a table of our metrics beside the published ones, like for like (SPEC.md):

  P5 / TIGER (generative, no history masking)       vs our full_unmasked/*
  SASRec / S3-Rec (S3-Rec code, history masked)     vs our full/*
  RecBole SASRec on the very same split (optional)  vs our full/*

Writes RESULTS_DIR/quality.json and prints the Markdown table used in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DATASETS = {
    "beauty": {"input": "data/amazon-beauty/Beauty.txt", "format": "sequence", "config": "configs/beauty.yaml"},
    "ml-100k": {"input": "data/ml-100k/u.data", "format": "movielens", "config": "configs/ml-100k.yaml"},
}

# Published Amazon Beauty numbers (HR@10 / NDCG@10) and the metric keys they compare to.
PUBLISHED = [
    ("P5-B (Geng et al., RecSys 2022, Table 3)", "full_unmasked", 0.0664, 0.0429),
    ("TIGER (Rajput et al., NeurIPS 2023, Table 2)", "full_unmasked", 0.0648, 0.0384),
    ("SASRec (P5 paper Table 3, from the S3-Rec code)", "full", 0.0605, 0.0318),
    ("S3-Rec (Zhou et al., CIKM 2020; P5 paper Table 3)", "full", 0.0647, 0.0327),
]


def run(cmd: list[str], log: Path) -> tuple[str, float]:
    """Run a CLI step, stderr to a log; return its stdout and wall time."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with open(log, "w") as err:  # this checkout's p5ray, also in the Ray workers (they inherit env)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return proc.stdout, time.perf_counter() - start


def bench_dataset(name: str, args, out: Path) -> dict:
    spec = DATASETS[name]
    p5ray = str(Path(sys.executable).parent / "p5ray")
    data = getattr(args, f"data_{name.replace('-', '_')}") or str(out / name / "data")
    if not (Path(data) / "manifest.json").exists():
        run([p5ray, "prepare", "--input", spec["input"], "--format", spec["format"], "--out", data], out / f"{name}-prepare.log")
    config = str(ROOT / spec["config"])
    cmd = [p5ray, "train", "--data", data, "--config", config, "--storage", str(out / name / "runs"), "--name", f"{name}-{int(time.time())}"]
    cmd += [f"--set={s}" for s in args.set]
    stdout, train_s = run(cmd, out / f"{name}-train.log")
    ckpt = [line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("checkpoint: ")][-1]
    metrics_file = out / f"{name}-test.json"
    run([p5ray, "evaluate", "--checkpoint", ckpt, "--data", data, "--output", str(metrics_file)], out / f"{name}-evaluate.log")
    metrics = json.loads(metrics_file.read_text())
    meta = json.loads((Path(ckpt) / "meta.json").read_text())
    result = {"data": data, "checkpoint": ckpt, "train_s": round(train_s, 1), "best_epoch": meta.get("epoch"), "metrics": metrics}
    if args.recbole_python:
        result["recbole"] = recbole_peer(name, data, config, args, out)
    return result


def write_atomic(data: str, work: Path) -> None:
    """Our prepared split as a RecBole atomic file: timestamp = position in the user's sequence."""
    import pyarrow.parquet as pq

    seqs = pq.read_table(Path(data) / "sequences.parquet", columns=["user_idx", "items"]).to_pydict()
    folder = work / "p5split"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "p5split.inter", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user, items in zip(seqs["user_idx"], seqs["items"], strict=True):
            f.writelines(f"{user}\t{item}\t{pos}\n" for pos, item in enumerate(items))


def recbole_peer(name: str, data: str, config: str, args, out: Path) -> dict:
    """RecBole's SASRec on the same prepared split, in its own virtualenv (bench/recbole_peer.py)."""
    import yaml

    cfg = yaml.safe_load(Path(config).read_text())
    epochs = args.recbole_epochs or cfg.get("train", {}).get("epochs", 40)
    result_file = out / f"{name}-recbole.json"
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # RecBole's own checkpoint files only
    work = out / name / "recbole"
    write_atomic(data, work)
    cmd = [args.recbole_python, str(ROOT / "bench" / "recbole_peer.py"), "--work", str(work),
           "--epochs", str(epochs), "--dim", str(cfg.get("model", {}).get("dim", 64)),
           "--dropout", str(cfg.get("model", {}).get("dropout", 0.5)), "--output", str(result_file)]
    start = time.perf_counter()
    with open(out / f"{name}-recbole.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}, see {out / f'{name}-recbole.log'}"}
    res = json.loads(result_file.read_text())
    res["wall_s"] = round(time.perf_counter() - start, 1)
    return res


def table(results: dict) -> str:
    lines = ["| data set | model | protocol (our key) | HR@10 | NDCG@10 | train time |", "|---|---|---|---|---|---|"]
    for name, res in results.items():
        m = res["metrics"]
        t = f"{res['train_s'] / 60:.1f} min (best epoch {res['best_epoch']})"
        for proto in ("full", "full_unmasked"):
            lines.append(f"| {name} | **p5ray** | {proto} | **{m[f'{proto}/hr@10']:.4f}** | **{m[f'{proto}/ndcg@10']:.4f}** | {t} |")
        lines.append(f"| {name} | **p5ray** | sampled (1+99) | {m['sampled/hr@10']:.4f} | {m['sampled/ndcg@10']:.4f} | |")
        lines.append(f"| {name} | popularity | full | {m['baseline/popularity/full/hr@10']:.4f} | {m['baseline/popularity/full/ndcg@10']:.4f} | |")
        peer = res.get("recbole")
        if peer and "error" not in peer:
            lines.append(f"| {name} | RecBole 1.2.1 SASRec, same split, {peer['epochs']} epochs | full | {peer['hr@10']:.4f} | {peer['ndcg@10']:.4f} | {peer['train_s'] / 60:.1f} min |")
        if name == "beauty":
            for label, proto, hr, ndcg in PUBLISHED:
                lines.append(f"| beauty | {label} | {proto} | {hr:.4f} | {ndcg:.4f} | published |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--data-beauty", help="an already prepared Beauty directory")
    ap.add_argument("--data-ml-100k", dest="data_ml_100k", help="an already prepared MovieLens-100K directory")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-quality"))
    ap.add_argument("--set", action="append", default=[], help="extra `p5ray train --set` overrides")
    ap.add_argument("--recbole-python", help="python of a RecBole 1.2.1 virtualenv: also run its SASRec peer")
    ap.add_argument("--recbole-epochs", type=int, help="peer epoch budget (default: train.epochs of our config)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {name: bench_dataset(name, args, out) for name in args.datasets}
    info = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"), "results": results}
    (out / "quality.json").write_text(json.dumps(info, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
