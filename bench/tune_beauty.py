"""How much does a sweep buy? Best tuned config vs the default config, on valid and test NDCG@10.

    p5ray prepare --input data/amazon-beauty/Beauty.txt --format sequence --out prepared/beauty
    python bench/tune_beauty.py --data prepared/beauty --num-samples 24            # the real run
    python bench/tune_beauty.py --data prepared/beauty --num-samples 2 \\
        --set train.epochs=2 --set train.valid_users=2000                          # a quick try

1. `p5ray tune` with the search space (default tune/search_space.yaml) -> the best trial's checkpoint.
2. The default config under the same fixed settings (the space's `base` and every --set, with
   every swept key left at its default) trained once with `p5ray train`'s fit().
3. `p5ray evaluate` of both checkpoints on the valid and the test split (full ranking, history
   masked). Prints one JSON object (also written to --out) and a Markdown row for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY = "full/ndcg@10"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared Amazon Beauty directory")
    parser.add_argument("--search-space", default=str(ROOT / "tune" / "search_space.yaml"))
    parser.add_argument("--num-samples", type=int, help="trials (default: the space's num_samples)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override for both runs")
    parser.add_argument("--storage", default="runs/bench")
    parser.add_argument("--out", default="bench/results/tune_beauty.json")
    args = parser.parse_args(argv)

    from p5ray import evaluate, train, tune
    from p5ray.config import from_dict
    from p5ray.tune_space import base_config, load_sweep

    stamp = time.strftime("%Y%m%d-%H%M%S")
    start = time.perf_counter()
    swept = tune.run(args.data, args.search_space, num_samples=args.num_samples, storage=args.storage,
                     name=f"tune-beauty-{stamp}", overrides=args.overrides)
    sweep_s = time.perf_counter() - start
    best = swept.rows[0]

    sweep = load_sweep(args.search_space, args.num_samples)
    default_cfg = from_dict(base_config(sweep, None, args.overrides))
    start = time.perf_counter()
    default = train.fit(args.data, default_cfg, storage=args.storage, name=f"default-beauty-{stamp}")
    default_s = time.perf_counter() - start

    scores = {}
    for label, checkpoint in (("tuned", best["checkpoint"]), ("default", default.checkpoint)):
        for split in ("valid", "test"):
            scores[f"{label}/{split}/ndcg@10"] = evaluate.run(checkpoint, args.data, split)[KEY]
    result = {
        "data": os.path.abspath(args.data),
        "search_space": args.search_space,
        "overrides": args.overrides,
        "trials": len(swept.rows),
        "trials_finished": sum(r["status"] == "TERMINATED" for r in swept.rows),
        "sweep_wall_s": round(sweep_s, 1),
        "default_wall_s": round(default_s, 1),
        "best_trial": best["trial_id"],
        "best_config": swept.best_config,
        "tuned_checkpoint": best["checkpoint"],
        "default_checkpoint": default.checkpoint,
        **{k: round(v, 5) for k, v in scores.items()},
        "gain/valid": round(scores["tuned/valid/ndcg@10"] - scores["default/valid/ndcg@10"], 5),
        "gain/test": round(scores["tuned/test/ndcg@10"] - scores["default/test/ndcg@10"], 5),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    print(
        f"| tune (Beauty) | {result['trials']} trials, {result['sweep_wall_s'] / 60:.0f} min | "
        f"valid NDCG@10 {scores['default/valid/ndcg@10']:.4f} -> {scores['tuned/valid/ndcg@10']:.4f} "
        f"({result['gain/valid']:+.4f}) | test NDCG@10 {scores['default/test/ndcg@10']:.4f} -> "
        f"{scores['tuned/test/ndcg@10']:.4f} ({result['gain/test']:+.4f}) |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
