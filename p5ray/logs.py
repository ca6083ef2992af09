"""What the user sees on stderr: p5ray's own log lines, and Ray's output kept out of the way.

    setup(verbose, quiet, fmt)   the `p5ray` logger: text or JSON lines on stderr, --quiet, --verbose
    quiet_ray_driver()           Ray's noise in this (driver) process: levels, filters, warnings
    route_ray_output()           lines Ray forwards from other processes: to stderr, noise dropped

Without --verbose, Ray's own INFO chatter and the known-harmless warnings below are not shown;
with --verbose everything Ray prints is shown as Ray prints it (stdout still carries only results:
Ray's forwarded lines go to stderr either way).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings

FORMAT_ENV = "P5RAY_LOG_FORMAT"
VERBOSE_ENV = "P5RAY_VERBOSE"
QUIET_ENV_FLAG = "P5RAY_QUIET"
FORWARDED = "p5ray.ray"  # the logger that carries lines Ray forwards from workers

# Lines Ray forwards to the driver that say nothing a p5ray user can act on. Each has no log-level
# or environment switch of its own (see the comments), so the driver's printer drops them.
NOISE = tuple(re.compile(p) for p in (
    # raylet, pushed through the GCS error channel: a 2-core machine starts more than 4 x 2 workers
    r"PYTHON worker processes have been started on node",
    # C++ core worker (RAY_LOG(ERROR), no level switch short of silencing all C++ errors):
    # Ray Train's PreemptionWatcher actor is created with max_restarts=-1
    r"has constructor arguments in the object store and max_restarts > 0",
    # Ray Data's progress bars inside Ray workers (e.g. Tune trials), sent as distributed tqdm updates
    # (ray.experimental.tqdm_ray.RAY_TQDM_MAGIC); the driver's own are off, these go the same way
    r"__ray_tqdm_magic_token__",
    # Ray Data, once per process, because p5ray turns its progress bars off
    r"^Progress bars (for operators )?disabled",
    # Ray Train V2 worker, INFO, on a logger named by its file path (outside `ray.train`)
    r"^Reporting training result \d+:",
    # gcs_server (C++ ERROR) when Ray Train or Ray Data tear down an actor whose process already ended
    r"Failed to kill actor [0-9a-f]+, return status: Invalid: KillActor RPC failed",
    # C++ core worker (ERROR) when a reused worker process gets a late kill for the actor it hosted
    # before (Ray Tune starting the next trial on the same process)
    r"Mismatched ActorID: ignoring KillActor for previous actor",
    # Ray Train's placement-group cleaner, WARNING, after every finished or ASHA-stopped Tune trial
    # (a real controller failure is reported by the trial itself)
    r"Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up placement group",
    # the autoscaler's one-time tip that comes with its first event
    r"^Tip: use `ray status` to view detailed cluster status",
    # Ray Serve's own INFO records (controller scaling/stopping replicas, per-request access lines),
    # which Serve writes to stderr; they stay in Ray's log files (/tmp/ray/session_latest/logs/serve),
    # Serve's WARNING and ERROR lines still reach the terminal
    r"^INFO \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \S+ ",
    # raylet at shutdown: Serve's controller is killed while its graceful_shutdown call is queued
    r"Task ServeController\.graceful_shutdown failed\. .*killed by `ray\.kill`",
))
# Multi-line blocks dropped whole: (first line, last line)
NOISE_BLOCKS = tuple((re.compile(a), re.compile(b)) for a, b in (
    # Ray Data's file listing, cancelled when its dataset is done, dies in a helper thread
    (r"^Exception in thread pool-\d+/completion-signaler:", r"^InterruptedError"),
))
# driver-side Ray log records dropped by message (logger name -> pattern)
DRIVER_NOISE = {
    # every local ray.init() says token auth is on by default; the README's security notes say it once
    "ray._private.authentication.authentication_token_setup": re.compile(r"^Token authentication is enabled"),
}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def json_mode() -> bool:
    return os.environ.get(FORMAT_ENV) == "json"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and any `fields` passed in `extra`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def handler(fmt: str = "text") -> logging.Handler:
    """A stderr handler in the user's format (looked up at emit time, so tests can capture it)."""
    out = logging.StreamHandler()
    out.stream = _Stderr()
    if fmt == "json":
        out.setFormatter(JsonFormatter())
    else:
        out.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return out


class _Stderr:
    """sys.stderr as it is when written to (pytest's capsys swaps it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def setup(verbose: bool = False, quiet: bool = False, fmt: str = "text") -> None:
    """Configure the `p5ray` logger; remember the choice in the environment for child processes."""
    os.environ[FORMAT_ENV] = fmt
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)
    if quiet:
        os.environ[QUIET_ENV_FLAG] = "1"
    else:
        os.environ.pop(QUIET_ENV_FLAG, None)
    root = logging.getLogger("p5ray")
    root.handlers[:] = [handler(fmt)]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    warnings_log = logging.getLogger("py.warnings")  # warnings.warn(...) in the user's format
    warnings_log.handlers[:] = [handler(fmt)]
    warnings_log.propagate = False
    logging.captureWarnings(True)
    if not verbose:
        from p5ray.raycluster import QUIET_ENV

        for key, value in QUIET_ENV.items():  # before Ray is imported or started: inherited by its processes
            os.environ.setdefault(key, value)
        for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.ERROR)


class _DropMessage(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_ray_driver() -> None:
    """Keep Ray's known-harmless driver-side messages off the terminal (no-op with --verbose).

    Call after `import ray`: Ray installs its own warning filters at import, and later filters win.
    """
    if verbose():
        return
    for name, pattern in DRIVER_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(pattern))
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # importing ray.data resets it
    quiet_ray_warnings()
    if json_mode():  # Ray's own driver log lines in the user's format too
        ray_logger = logging.getLogger("ray")
        ray_logger.handlers[:] = [handler("json")]
        ray_logger.propagate = False


def quiet_ray_warnings() -> None:
    """Deprecation and future warnings raised inside Ray's own modules (the user cannot act on them)."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"ray(\.|$)")


def route_ray_output() -> None:
    """Lines Ray forwards to this driver (worker output, raylet warnings) go to stderr, never stdout.

    Ray prints them from its own threads with `ray._private.worker.print_to_stdstream`, and prints
    the raylet's warnings (the GCS error channel) to stdout; there is no setting for either. p5ray
    wraps that one function: stdout keeps only results, NOISE is dropped unless --verbose, and
    without --verbose the lines go through the `p5ray.ray` logger (so --quiet and --log-format
    apply to them). Install before ray.init(): Ray binds the function when it connects.
    """
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "p5ray_wrapped", False):
        return

    def print_to_stdstream(data, ignore_prefix):
        if verbose():
            return original({**data, "is_err": True}, ignore_prefix)
        log_forwarded(data)

    print_to_stdstream.p5ray_wrapped = True
    ray_worker.print_to_stdstream = print_to_stdstream


def log_forwarded(data: dict) -> None:
    """Ray's forwarded lines -> the `p5ray.ray` logger, less NOISE; raylet lines are warnings."""
    logger = logging.getLogger(FORWARDED)
    source = data.get("actor_name") or data.get("task_name") or data.get("pid") or "ray"
    level = logging.WARNING if data.get("pid") in ("raylet", "autoscaler") or data.get("is_err") else logging.INFO
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # the monitor's whole log: keep its events, as Ray does
        from ray._private.worker import filter_autoscaler_events

        lines = list(filter_autoscaler_events(lines))
    for line in drop_noise_blocks(lines):
        if not line.strip() or is_noise(line):
            continue
        logger.log(level, "(%s) %s", source, line, extra={"fields": {"source": str(source)}})


def is_noise(line: str) -> bool:
    return any(p.search(line) for p in NOISE)


def drop_noise_blocks(lines: list[str]) -> list[str]:
    """`lines` without the NOISE_BLOCKS in them (a block left open at the end is dropped too)."""
    out, closing = [], None
    for line in lines:
        if closing is None:
            closing = next((end for start, end in NOISE_BLOCKS if start.search(line)), None)
            if closing is None:
                out.append(line)
        elif closing.search(line):
            closing = None
    return out
