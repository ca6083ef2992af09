"""`p5ray VERB ...`: one verb -> one stage's run().

stdout carries results, logs go to stderr. Exit codes: 0 success; 2 bad usage, bad input or an
environment problem the user can fix (one line, no traceback unless --verbose); 1 internal failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback

from p5ray.errors import P5RayError, UserError

log = logging.getLogger("p5ray")


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and one line on bad usage (its default, kept explicit)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"p5ray: error: {message}\n")


def _verb(sub, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(parser)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show tracebacks and Ray's own logs")
    parser.add_argument("--quiet", action="store_true", help="only results and errors")
    parser.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="log lines on stderr"
    )


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see p5ray/configs/default.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key (repeatable), e.g. --set train.epochs=5",
    )


def _add_prepare(sub) -> None:
    p = _verb(
        sub,
        "prepare",
        "Read an interaction log with Ray Data, validate it, map ids, order by time, split "
        "leave-one-out and write Parquet + vocab + manifest.json.",
        "p5ray prepare --input data/ml-100k/u.data --out prepared/ml-100k",
    )
    p.add_argument("--input", required=True, help="interaction log (file or directory)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "movielens", "sequence", "csv", "tsv", "parquet", "jsonl", "amazon-json"],
    )
    p.add_argument(
        "--user-features", help="user feature table (MovieLens u.user is found beside u.data)"
    )
    p.add_argument(
        "--item-features", help="item feature table (MovieLens u.item is found beside u.data)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--max-bad-fraction", type=float, default=0.01)
    p.add_argument("--vocab-from", help="earlier prepared directory whose id indices are kept")
    p.add_argument("--user-col", help="column holding user ids (generic formats)")
    p.add_argument("--item-col", help="column holding item ids (generic formats)")
    p.add_argument("--time-col", help="column holding timestamps (generic formats)")
    p.add_argument("--rating-col", help="column holding ratings (generic formats)")
    p.add_argument("--event-col", help="column holding event types (generic formats)")
    p.add_argument(
        "--short-users",
        choices=["train-only", "drop"],
        default="train-only",
        help="users with fewer than 3 interactions: keep for training only, or drop",
    )
    p.add_argument(
        "--cross-sell-events",
        default="purchase",
        metavar="TYPES",
        help="comma-separated event types whose consecutive pairs feed cross-sell (default: purchase)",
    )
    p.add_argument(
        "--rating-range",
        nargs=2,
        type=float,
        metavar=("LO", "HI"),
        help="ratings outside [LO, HI] are quarantined (default: MovieLens 0.5 5, Amazon 1 5, else any)",
    )
    p.add_argument("--vocab-seed", type=int, help="seed of the id numbering hash (default 42)")
    p.set_defaults(run=_run_prepare)


def _run_prepare(args) -> int:
    from p5ray import prepare

    if not args.verbose:  # importing ray.data (prepare does) resets its logger to INFO
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    opts = prepare.PrepareOptions(
        input=args.input,
        out=args.out,
        format=args.format,
        user_features=args.user_features,
        item_features=args.item_features,
        overwrite=args.overwrite,
        max_bad_fraction=args.max_bad_fraction,
        vocab_from=args.vocab_from,
        user_col=args.user_col,
        item_col=args.item_col,
        time_col=args.time_col,
        rating_col=args.rating_col,
        event_col=args.event_col,
        short_users=args.short_users,
        cross_sell_events=tuple(e.strip() for e in args.cross_sell_events.split(",") if e.strip()),
        rating_range=tuple(args.rating_range) if args.rating_range else None,
        vocab_seed=args.vocab_seed,
    )
    manifest = prepare.run(opts)
    summary = {
        k: manifest[k] for k in ("users", "items", "interactions", "rows_in", "rows_quarantined")
    }
    print(json.dumps(summary))
    print(f"data: {os.path.abspath(args.out)}")
    return 0


def _add_train(sub) -> None:
    p = _verb(
        sub,
        "train",
        "Train the multi-task model with Ray Train (TorchTrainer, DDP) on a prepared data directory; "
        "prints `checkpoint: PATH` of the best checkpoint by valid/ndcg@10 last.",
        "p5ray train --data prepared/ml-100k --num-workers 2 --set train.epochs=20",
    )
    p.add_argument("--data", required=True, help="prepared data directory (from `p5ray prepare`)")
    _add_config_flags(p)
    p.add_argument("--num-workers", type=int, help="Ray Train workers (default: train.num_workers = 2)")
    p.add_argument("--use-gpu", action="store_true", help="one worker per GPU, NCCL, bf16 autocast")
    p.add_argument("--storage", default="runs", help="where runs and checkpoints go (shared path or s3://)")
    p.add_argument("--name", help="run name (default: train-DATE-TIME)")
    p.add_argument("--resume", action="store_true", help="continue the run --storage/--name")
    p.add_argument("--init-from", help="warm start from this checkpoint (vocab may have grown)")
    p.add_argument("--mlflow-uri", help="also log the run to this MLflow tracking URI, e.g. file:./mlruns (needs mlflow)")
    p.set_defaults(run=_run_train)


def _load_cli_config(args):
    from p5ray.config import load_config, replace

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "num_workers", None):
        cfg = replace(cfg, train={"num_workers": args.num_workers})
    if getattr(args, "use_gpu", False):
        cfg = replace(cfg, train={"use_gpu": True})
    return cfg


def _run_train(args) -> int:
    from p5ray import train

    cfg = _load_cli_config(args)
    result = train.fit(
        args.data, cfg, storage=args.storage, name=args.name, resume=args.resume, init_from=args.init_from,
        mlflow_uri=args.mlflow_uri,
    )
    keys = ("epoch", "valid/ndcg@10", "valid/hr@10")
    print(json.dumps({k: result.metrics[k] for k in keys if k in result.metrics}))
    print(f"run: {result.run_dir}")
    if result.report:
        print(f"report: {result.report}")
    print(f"checkpoint: {os.path.abspath(result.checkpoint)}")
    return 0


def _add_evaluate(sub) -> None:
    p = _verb(
        sub,
        "evaluate",
        "Offline metrics of a checkpoint on a prepared data directory, as one JSON object on stdout.",
        "p5ray evaluate --checkpoint runs/NAME/checkpoint_epoch_0040 --data prepared/ml-100k",
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", choices=["test", "valid"], default="test")
    p.add_argument("--output", help="also write the JSON here")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from p5ray import evaluate

    metrics = evaluate.run(args.checkpoint, args.data, args.split, args.output)
    print(json.dumps(metrics))
    return 0


def _add_serve(sub) -> None:
    p = _verb(
        sub,
        "serve",
        "Serve a checkpoint with Ray Serve: the combined app p5ray (/v1/recommend, /v1/recall, /v1/rank, "
        "/v1/cross-sell, /v1/rating) and per-task apps, over HTTP and gRPC; prints `http: URL` and "
        "`grpc: HOST:PORT` once ready and blocks until Ctrl-C / SIGTERM.",
        "p5ray serve --checkpoint runs/NAME/checkpoint_epoch_0040 --http-port 8000 --grpc-port 9000",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (printed by `p5ray train`)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (gRPC binds all interfaces: see README)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--replicas", type=int, help="replicas per task deployment (default 1)")
    p.add_argument("--use-gpu", action="store_true", help="hold the model on a GPU: each set of task replicas shares one")
    p.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    from p5ray import server

    return server.run(args.checkpoint, args.host, args.http_port, args.grpc_port, args.replicas, use_gpu=args.use_gpu)


def _add_recommend(sub) -> None:
    p = _verb(
        sub,
        "recommend",
        "Ask a running `p5ray serve` for a user's recommendations (POST /v1/recommend); prints a table.",
        "p5ray recommend --user 196 --k 10",
    )
    p.add_argument("--user", required=True, help="user id (unknown users get the cold-start answer)")
    p.add_argument("--k", type=int, default=10, help="how many items, 1..1000")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--history", nargs="*", default=[], metavar="ITEM", help="recent item ids, oldest first")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    p.set_defaults(run=_run_recommend)


def _run_recommend(args) -> int:
    from p5ray import server

    return server.recommend(args.user, args.k, args.url, args.history, raw=args.json)


def _add_tune(sub) -> None:
    p = _verb(
        sub,
        "tune",
        "Ray Tune sweep over the same training function as `train` (Train + Tune): task weights, "
        "learning rate, regularisation, width. Writes leaderboard.csv, best_config.yaml and plots "
        "in STORAGE/NAME; prints `best_config: PATH` last.",
        "p5ray tune --data prepared/ml-100k --search-space tune/search_space.yaml --num-samples 16",
    )
    p.add_argument("--data", required=True, help="prepared data directory (from `p5ray prepare`)")
    p.add_argument("--search-space", required=True, help="sweep YAML (see tune/search_space.yaml)")
    p.add_argument("--num-samples", type=int, help="trials to run (default: num_samples in the YAML)")
    p.add_argument("--storage", default="runs", help="where sweeps go (a local path, or a shared mount on a cluster)")
    p.add_argument("--name", help="sweep name (default: tune-DATE-TIME)")
    p.add_argument("--resume", action="store_true", help="continue the sweep --storage/--name")
    p.add_argument("--mlflow-uri", help="also log trials to this MLflow tracking URI (needs mlflow)")
    _add_config_flags(p)
    p.set_defaults(run=_run_tune)


def _run_tune(args) -> int:
    import contextlib

    from p5ray import tune

    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples {args.num_samples}: expected 1 or more")
    with contextlib.redirect_stdout(sys.stderr):  # Tune prints its own banners on stdout
        result = tune.run(
            args.data, args.search_space, num_samples=args.num_samples, storage=args.storage,
            name=args.name, resume=args.resume, config_path=args.config, overrides=args.overrides,
            mlflow_uri=args.mlflow_uri,
        )
        tune.shutdown_ray()  # no late Ray log line may follow the results
    tune.print_summary(result)
    return 0


def _add_quickstart(sub) -> None:
    p = _verb(
        sub,
        "quickstart",
        "The main job end to end on the bundled MovieLens-100K with an embedded local Ray: prepare -> "
        "train (2 workers) -> evaluate -> serve -> one real HTTP and gRPC request -> shutdown.",
        "p5ray quickstart --workdir .quickstart",
    )
    p.add_argument("--workdir", default=".quickstart", help="where data and runs go")
    p.add_argument("--input", help="another MovieLens-style log instead of the bundled one")
    p.add_argument("--user", default="196", help="the user to ask recommendations for")
    _add_config_flags(p)
    p.set_defaults(run=_run_quickstart)


def _run_quickstart(args) -> int:
    from p5ray import quickstart

    return quickstart.run(args.workdir, args.input, args.config, args.overrides, args.user)


def _add_submit(sub) -> None:
    p = _verb(
        sub,
        "submit",
        "Run any verb as a Ray Job on a cluster (Ray Jobs SDK): uploads this project as the working "
        "dir, streams the job's stdout to stdout and its logs to stderr, exits 0 if the job "
        "succeeded, 1 if it failed, 2 if it could not be submitted. Auth token: RAY_AUTH_TOKEN, "
        "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.",
        "p5ray submit --address http://HEAD:8265 -- train --data /shared/ml --storage /shared/runs",
    )
    p.add_argument("--address", help="dashboard URL of the cluster (default: RAY_ADDRESS, else http://127.0.0.1:8265)")
    p.add_argument("--no-wait", action="store_true", help="submit, print the job id and return")
    p.add_argument("--working-dir", help="directory to upload (default: the p5ray project root)")
    job = p.add_mutually_exclusive_group()
    job.add_argument("--status", metavar="JOB", help="print the status of job JOB")
    job.add_argument("--logs", metavar="JOB", help="stream the logs of job JOB until it ends")
    job.add_argument("--stop", metavar="JOB", help="stop job JOB")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- VERB ARGS... (the p5ray command to run)")
    p.set_defaults(run=_run_submit)


def _run_submit(args) -> int:
    from p5ray import submit

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    looking_up = args.status or args.logs or args.stop
    if looking_up and command:
        raise UserError("give either -- VERB ARGS... or one of --status/--logs/--stop, not both")
    if command and command[0] != "submit":
        try:  # the verb's own usage errors show here, before anything is uploaded
            build_parser().parse_args(command)
        except SystemExit as exc:
            return int(exc.code or 0)
    return submit.run(
        command, args.address, wait=not args.no_wait, working_dir=args.working_dir,
        status=args.status, logs=args.logs, stop=args.stop,
    )


def _add_batch_recommend(sub) -> None:
    p = _verb(
        sub,
        "batch-recommend",
        "Top-K for every user (or the --users listed) with Ray Data: the checkpoint loaded once per "
        "actor, the same answers as POST /v1/recommend (seen items masked), written as Parquet "
        "(user_id, rank, item_id, score); --cross-sell also writes per-item cross-sell lists.",
        "p5ray batch-recommend --checkpoint runs/NAME/checkpoint_epoch_0040 --data prepared/ml-100k "
        "--k 50 --out top50.parquet",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (printed by `p5ray train`)")
    p.add_argument("--data", required=True, help="the prepared data directory the checkpoint was trained on")
    p.add_argument("--k", type=int, default=50, help="items per user, 1..1000")
    p.add_argument("--out", required=True, help="FILE.parquet (one file) or a directory of part files")
    p.add_argument("--users", help="only these users: a file with one raw user id a line (or a Parquet user_id column)")
    p.add_argument("--num-workers", type=int, default=1, help="actors, each holding the model once")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--cross-sell", action="store_true", help="also write per-item cross-sell lists beside --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--batch-size", type=int, default=256, help="users per batch")
    p.add_argument("--chunk-items", type=int, default=65536, help="catalog chunk of the scoring (bounds memory)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (and torch threads) per actor")
    p.set_defaults(run=_run_batch_recommend)


def _run_batch_recommend(args) -> int:
    from p5ray import batch

    if not args.verbose:  # importing ray.data resets its logger to INFO
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    opts = batch.BatchOptions(
        checkpoint=args.checkpoint, data=args.data, out=args.out, k=args.k, users=args.users,
        num_workers=args.num_workers, use_gpu=args.use_gpu, cross_sell=args.cross_sell,
        overwrite=args.overwrite, batch_size=args.batch_size, chunk_items=args.chunk_items,
        cpus_per_worker=args.cpus_per_worker,
    )
    summary = batch.run(opts)
    print(json.dumps(summary))
    print(f"recommendations: {summary['out']}")
    if "cross_sell_out" in summary:
        print(f"cross_sell: {summary['cross_sell_out']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="p5ray",
        description="Train, sweep and serve a P5-style multi-task recommender on Ray.",
        epilog="example:\n  p5ray quickstart",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for add in VERBS:
        add(sub)
    return parser


VERBS = [
    _add_prepare, _add_train, _add_evaluate, _add_tune, _add_serve, _add_recommend, _add_submit,
    _add_quickstart,
]
VERBS.append(_add_batch_recommend)


def _setup_logging(args) -> None:
    from p5ray import logs

    logs.setup(getattr(args, "verbose", False), getattr(args, "quiet", False), getattr(args, "log_format", "text"))


def _add_report(sub) -> None:
    p = _verb(
        sub,
        "report",
        "Regenerate the report of a run (report.md + PNG plots: loss per task and validation "
        "NDCG@10/HR@10 per epoch, best epoch marked) or of a sweep (leaderboard, plots), and print "
        "a summary; or, with --compare, write a Markdown table comparing checkpoints. Prints "
        "`report: PATH` last.",
        "p5ray report runs/NAME\n"
        "  p5ray report --compare runs/A/checkpoint_epoch_0040 runs/B/checkpoint_epoch_0030 --data prepared/ml-100k",
    )
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="STORAGE/NAME of a `train` run or a `tune` sweep")
    p.add_argument("--compare", nargs="+", metavar="CKPT", help="checkpoints to compare (their recorded metrics)")
    p.add_argument("--data", help="with --compare: also evaluate each checkpoint on this prepared data")
    p.add_argument("--split", choices=["test", "valid"], default="test", help="with --data: the split to evaluate")
    p.add_argument("--out", default="compare.md", help="with --compare: where the table goes (default compare.md)")
    p.set_defaults(run=_run_report)


def _run_report(args) -> int:
    if bool(args.run_dir) == bool(args.compare):
        raise UserError("give RUN_DIR, or --compare CKPT CKPT ..., not both and not neither",
                        "e.g. p5ray report runs/NAME")
    if args.compare:
        from p5ray.compare import compare

        if args.data is not None and not os.path.isdir(args.data):
            raise UserError(f"--data {args.data} does not exist", "pass a directory written by `p5ray prepare`")
        print(f"report: {compare(args.compare, args.data, args.split, args.out)}")
        return 0
    from p5ray import report

    summary = report.run(args.run_dir)
    if summary.table:
        print(summary.table)
    print(json.dumps(summary.numbers))
    if summary.best_checkpoint:
        print(f"best_checkpoint: {summary.best_checkpoint}")
    print(f"report: {summary.report}")
    return 0


def _add_completion(sub) -> None:
    p = _verb(
        sub,
        "completion",
        "Print a shell completion script for p5ray (verbs, flags, choices, file names), generated "
        "from this command line. bash: add `eval \"$(p5ray completion bash)\"` to ~/.bashrc; zsh: "
        "`p5ray completion zsh > \"${fpath[1]}/_p5ray\"`.",
        'p5ray completion bash > ~/.local/share/bash-completion/completions/p5ray',
    )
    p.add_argument("shell", choices=["bash", "zsh"])
    p.set_defaults(run=_run_completion)


def _run_completion(args) -> int:
    from p5ray.completion import script

    print(script(args.shell, build_parser()), end="")
    return 0


VERBS += [_add_report, _add_completion]
RAY_VERBS = {"prepare", "train", "tune", "serve", "quickstart", "batch-recommend"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        if args.verb in RAY_VERBS:
            from p5ray.raycluster import prepare_driver

            prepare_driver()  # a RAY_ADDRESS with nothing behind it fails here, in one line
        return int(args.run(args) or 0)
    except P5RayError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"p5ray {args.verb}: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"p5ray {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal failure: exit 1, traceback only with --verbose
        if args.verbose:
            traceback.print_exc()
        print(
            f"p5ray {args.verb}: internal error: {type(exc).__name__}: {exc} "
            "(rerun with --verbose for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "UserError"]
