"""scripts/gpu_check.py runs with torch and p5ray's pure-torch model code only: without CUDA it
says so and exits 0; its measurements run at toy sizes on CPU; on a GPU box, for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
# importing any of these fails inside the script's process: it must not need them
WITHOUT_RAY = (
    "import runpy, sys\n"
    "for name in ('ray', 'pyarrow', 'pandas', 'yaml', 'fastapi', 'grpc'): sys.modules[name] = None\n"
    "sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def run_script(*args: str, cuda: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, "-c", WITHOUT_RAY, str(SCRIPT), *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd="/")


def test_without_cuda_it_says_so_and_exits_0():
    done = run_script()
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("no CUDA GPU here") and "nothing measured" in done.stdout


def test_every_measurement_runs_at_toy_size_on_cpu_without_ray():
    done = run_script("--cpu-smoke")
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()[3:]
    assert len(rows) == 4 + 8  # 2 losses x 2 precisions, 2 catalogs x 2 batch sizes x 2 precisions
    assert sum("train step, full softmax" in r for r in rows) == 2
    assert sum("train step, sampled softmax" in r for r in rows) == 2
    assert all("samples/s" in r for r in rows[:4]) and all("users/s" in r for r in rows[4:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_it_measures_beauty_sizes():
    done = run_script(cuda=True)
    assert done.returncode == 0, done.stderr
    assert "12,101 items" in done.stdout and "1,000,000 items" in done.stdout
