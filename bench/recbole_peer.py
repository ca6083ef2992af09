"""RecBole 1.2.1 SASRec on a p5ray prepared split (runs in RecBole's own virtualenv, not p5ray's).

    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 /tmp/recbole-venv/bin/python bench/recbole_peer.py \
        --work WORK_DIR --epochs 80 --output peer.json

WORK_DIR/p5split/p5split.inter is written by bench/quality.py (`write_atomic`, in p5ray's own
environment) from the prepared `sequences.parquet`: every interaction, timestamp = position in
the user's time-ordered sequence, so RecBole's leave-one-out split ('LS', valid_and_test, time
order) holds out exactly our valid and test items. Full ranking with the user's history masked
is RecBole's full-sort protocol, i.e. our `full/*` keys. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 is
for RecBole's own checkpoint files (it pickles its config), never for p5ray's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dropout", type=float, default=0.5)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    work = Path(args.work).resolve()
    n = sum(1 for _ in open(work / "p5split" / "p5split.inter")) - 1

    from recbole.quick_start import run_recbole

    config = {
        "data_path": str(work), "checkpoint_dir": str(work / "saved"),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        "MAX_ITEM_LIST_LENGTH": 50,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "loss_type": "CE", "train_neg_sample_args": None,
        "hidden_size": args.dim, "inner_size": 4 * args.dim, "n_layers": 2, "n_heads": 2,
        "hidden_dropout_prob": args.dropout, "attn_dropout_prob": args.dropout,
        "epochs": args.epochs, "train_batch_size": 256, "eval_batch_size": 4096, "learning_rate": 0.001,
        "stopping_step": args.patience, "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
        "seed": 42, "reproducibility": True, "device": "cpu", "use_gpu": False, "show_progress": False,
        "worker": 0,
    }
    start = time.perf_counter()
    res = run_recbole(model="SASRec", dataset="p5split", config_dict=config)
    train_s = time.perf_counter() - start
    test = res["test_result"]
    out = {
        "model": "RecBole 1.2.1 SASRec (CE loss)", "interactions": n, "epochs": args.epochs,
        "hr@10": float(test["hit@10"]), "ndcg@10": float(test["ndcg@10"]),
        "valid_ndcg@10": float(res["best_valid_score"]), "train_s": round(train_s, 1), "config": config,
    }
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "config"}))


if __name__ == "__main__":
    main()
