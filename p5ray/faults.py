"""Test-only fault injection. Inert unless P5RAY_FAULT is set; a normal run never sets it.

The reliability tests (tests/test_faults_*.py) inject real faults through these hooks and then
kill, time and check the real processes. Each hook costs one dict lookup when the variable is unset.

    P5RAY_FAULT="KIND key=value ..."   what to inject and where
    P5RAY_FAULT_DIR=DIR                where a hook reports (pid files) and what it waits for

Training (`fit` forwards the variables to every worker through the loop config, so they also
reach workers of a Ray that was started before they were set):

    pause rank=R epoch=E step=S   rank R, after optimizer step S of epoch E (1-based), writes its
                                  pid to DIR/pause-rank-R.pid and sleeps (at most `hold_s`) for
                                  the test to kill it or the driver; once: a pid file left from an
                                  earlier attempt disables it, so the restarted run goes on
    bad_index rank=R              rank R's shard gets item indices past the catalogue: the first
                                  forward pass on that rank raises IndexError; every firing appends
                                  a line to DIR/fired (how many attempts ran it)

Serving (read in the task replicas; the test sets the variables in their runtime_env):

    stall deployment=D            the first replica of D to rename DIR/stall away claims the stall:
                                  its request path then hangs; the others go on answering
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

ENV = "P5RAY_FAULT"
ENV_DIR = "P5RAY_FAULT_DIR"


def spec_from_env(environ=None) -> dict | None:
    """The fault named by P5RAY_FAULT (+ its DIR), or None: what `fit` forwards to workers."""
    environ = os.environ if environ is None else environ
    text = environ.get(ENV, "").strip()
    if not text:
        return None
    kind, *pairs = text.split()
    spec = {"kind": kind, "dir": environ.get(ENV_DIR, ".")}
    for pair in pairs:
        key, _, value = pair.partition("=")
        spec[key] = int(value) if value.lstrip("-").isdigit() else value
    return spec


def _fired(spec: dict, what: str) -> None:
    with open(Path(spec["dir"]) / "fired", "a") as f:
        f.write(f"{what} pid={os.getpid()} at={time.time():.3f}\n")


# -- training ---------------------------------------------------------------------------------


def corrupt_shard(spec: dict | None, rank: int, rows: dict, num_items: int) -> None:
    """bad_index: every training window of this rank's shard gets an index past the catalogue."""
    if not spec or spec["kind"] != "bad_index" or spec.get("rank") != rank:
        return
    items = rows["items"]
    for i, window in enumerate(items):  # windows may be read-only views of Arrow buffers
        items[i] = [num_items + 7, *list(window)[1:]]
    _fired(spec, f"bad_index rank={rank}")


def watch_steps(spec: dict | None, rank: int, optimizer, scheduler, steps_per_epoch: int) -> None:
    """pause: an optimizer post-hook that holds rank R at (epoch, step) for the test's kill."""
    if not spec or spec["kind"] != "pause" or spec.get("rank") != rank:
        return
    pid_file = Path(spec["dir"]) / f"pause-rank-{rank}.pid"
    if pid_file.exists():  # fired in an earlier attempt: the restarted run goes on untouched
        return
    at = (int(spec.get("epoch", 1)) - 1) * steps_per_epoch + int(spec.get("step", 1)) - 1

    def hook(_optimizer, _args, _kwargs):
        if scheduler.last_epoch != at:  # the scheduler steps after the optimizer: the global step
            return
        tmp = pid_file.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, pid_file)
        _fired(spec, f"pause rank={rank} step={at + 1}")
        time.sleep(float(spec.get("hold_s", 300)))

    optimizer.register_step_post_hook(hook)


# -- serving ----------------------------------------------------------------------------------

_claimed: set[str] = set()
_lock = threading.Lock()


def stall_point(deployment: str) -> None:
    """stall: hang here forever if this replica of `deployment` claimed the stall."""
    spec = spec_from_env()
    if not spec or spec["kind"] != "stall" or spec.get("deployment") != deployment:
        return
    with _lock:
        if deployment not in _claimed:
            try:
                os.rename(Path(spec["dir"]) / "stall", Path(spec["dir"]) / f"stalled-{os.getpid()}")
            except FileNotFoundError:  # not triggered yet, or another replica claimed it
                return
            _claimed.add(deployment)
            _fired(spec, f"stall {deployment}")
    threading.Event().wait()
