"""Helpers of the fault tests: run the CLI against this session's Ray, wait for a hook, kill by pid."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.helpers import ROOT


def main_in_process(argv: list[str]) -> int:
    """`p5ray ARGV` through cli.main in this process (its exit code), leaving the p5ray logger
    as it found it: cli.main points it at the sys.stderr of the moment (pytest's capture)."""
    from p5ray import cli

    logger = logging.getLogger("p5ray")
    saved = logger.handlers[:], logger.level, logger.propagate
    try:
        return cli.main(argv)
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def session_address() -> str:
    """The GCS address of this test session's own Ray (a driver started with it joins it)."""
    import ray

    return ray.get_runtime_context().gcs_address


def cli_process(*args: str, fault: str | None = None, fault_dir: Path | None = None) -> subprocess.Popen:
    """`p5ray ARGS` as a separate driver on this session's Ray, with an optional fault (faults.py)."""
    env = {**os.environ, "RAY_ADDRESS": session_address(), "PYTHONPATH": str(ROOT)}
    env.pop("P5RAY_FAULT", None)
    if fault:
        env.update(P5RAY_FAULT=fault, P5RAY_FAULT_DIR=str(fault_dir))
    return subprocess.Popen(
        [sys.executable, "-m", "p5ray.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{err[-3000:]}") from None
    return process.returncode, out, err


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 400) -> str:
    """The text of `path` once a hook wrote it; fails early if `process` ended first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"ended ({process.returncode}) before {path.name} appeared:\n{err[-3000:]}")
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout} s"
        time.sleep(0.2)
    return path.read_text()


def kill(pid: int) -> float:
    """SIGKILL one process this test identified (a pid its own hook reported); the kill time."""
    os.kill(pid, signal.SIGKILL)
    return time.time()


def max_weight_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between the weights of two checkpoints (model.pt)."""
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].numel())


def fired(fault_dir: Path) -> list[str]:
    file = fault_dir / "fired"
    return file.read_text().splitlines() if file.exists() else []
