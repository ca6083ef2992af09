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


VERBS = [_add_prepare]


def _setup_logging(args) -> None:
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    if getattr(args, "log_format", "text") == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("p5ray")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    if not getattr(args, "verbose", False):
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
            logging.getLogger(name).setLevel(logging.WARNING)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": self.formatTime(record),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
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
