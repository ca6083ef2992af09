"""Helpers for the cluster tests: a tiny prepared data directory (the format of docs/design.md,
written in a blink without `p5ray prepare`) and a real multi-node Ray cluster on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

INT_LIST = pa.list_(pa.int32())
FLOAT_LIST = pa.list_(pa.float32())


def make_prepared(out: str | Path, users: int = 48, items: int = 30, seed: int = 0) -> Path:
    """Users walk the catalog in steps of 1 or 2 from a random start: learnable, not trivial."""
    out = Path(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    seqs, rats = [], []
    for _ in range(users):
        start, step, n = rng.integers(items), 1 + rng.integers(2), 6 + rng.integers(8)
        seqs.append([int((start + step * k) % items) + 1 for k in range(n)])
        rats.append([float(1 + rng.integers(5)) for _ in range(n)])
    user_idx = pa.array(range(1, users + 1), pa.int32())
    pq.write_table(pa.table({
        "user_idx": user_idx,
        "items": pa.array([s[:-2] for s in seqs], INT_LIST),
        "ratings": pa.array([r[:-2] for r in rats], FLOAT_LIST),
    }), out / "train.parquet")
    for name, cut in (("valid", 2), ("test", 1)):
        pq.write_table(pa.table({
            "user_idx": user_idx,
            "history": pa.array([s[:-cut] for s in seqs], INT_LIST),
            "target": pa.array([s[-cut] for s in seqs], pa.int32()),
            "target_rating": pa.array([r[-cut] for r in rats], pa.float32()),
        }), out / f"{name}.parquet")
    counts = np.zeros(items + 1, np.int64)
    for s in seqs:
        np.add.at(counts, s[:-2], 1)
    pq.write_table(pa.table({
        "item_idx": pa.array(range(1, items + 1), pa.int32()),
        "item_id": [f"i{i}" for i in range(1, items + 1)],
        "train_count": counts[1:],
    }), out / "items.parquet")
    pq.write_table(pa.table({
        "user_idx": user_idx,
        "user_id": [f"u{u}" for u in range(1, users + 1)],
        "n_interactions": pa.array([len(s) for s in seqs], pa.int32()),
    }), out / "users.parquet")
    pq.write_table(pa.table({
        "user_idx": user_idx,
        "items": pa.array(seqs, INT_LIST),
        "timestamps": pa.array([None] * users, pa.list_(pa.int64())),
        "ratings": pa.array(rats, FLOAT_LIST),
    }), out / "sequences.parquet")
    n = sum(len(s) for s in seqs)
    manifest = {
        "users": users, "items": items, "interactions": n, "has_ratings": True,
        "rating_min": 1.0, "rating_max": 5.0, "user_features": {}, "item_features": {},
        "rows_in": n, "rows_kept": n, "rows_quarantined": 0, "rows_dropped": 0,
        "quarantined_by_reason": {}, "dropped_by_reason": {},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


# -- a real multi-node Ray cluster on loopback ----------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_hide_directory() -> bool:
    """Whether a process can get a private mount namespace (root, or unprivileged user namespaces)."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


class LoopbackCluster:
    """`ray start --head` plus `ray start --address` nodes on one machine, token auth on.

    Each node is its own process group with its own temp dir and ports, so it never touches
    another Ray on the machine; stop() ends exactly those process groups. With `hidden`, the last
    node runs in a private mount namespace where that directory is an empty tmpfs: a real node
    that cannot see a path the others see (what a node-local disk looks like to a driver).
    """

    def __init__(self, node_cpus: tuple[int, ...] = (1, 1), hidden: Path | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="p5c-", dir="/tmp"))  # short: socket paths
        self.node_cpus = node_cpus
        self.hidden = hidden
        self.token = secrets.token_hex(32)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[subprocess.Popen] = []
        bin_dir = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env = {
            **env,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
            # Ray helpers inside the cluster find their dashboard here, never by scanning the
            # machine (which may run other Ray clusters)
            "RAY_API_SERVER_ADDRESS": self.url,
        }

    def _node_command(self, index: int) -> list[str]:
        ray = str(Path(sys.executable).parent / "ray")
        cmd = [
            ray, "start", "--block", f"--num-cpus={self.node_cpus[index]}", "--num-gpus=0",
            f"--temp-dir={self.root / f'n{index}'}", "--object-store-memory=200000000",
            "--node-ip-address=127.0.0.1",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--min-worker-port={22000 + 1000 * index}", f"--max-worker-port={22999 + 1000 * index}",
        ]
        if index == 0:
            return cmd + [
                "--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
                "--disable-usage-stats",
            ]
        cmd.append(f"--address=127.0.0.1:{self.gcs_port}")
        if self.hidden is not None and index == len(self.node_cpus) - 1:
            mount = 'mount -t tmpfs tmpfs "$0" && exec "$@"'
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(self.hidden), *cmd]
        return cmd

    def start(self, timeout_s: float = 240.0, attempts: int = 3) -> LoopbackCluster:
        """Start every node. Ray gives a starting node fixed deadlines (its raylet waits ~15 s for
        the dashboard agent, `ray start` 30 s for the raylet): on a machine busy enough to miss
        them, that node exits, and it is started again (a new head means new ports)."""
        for attempt in range(attempts):
            try:
                return self._start_nodes(timeout_s)
            except RuntimeError:
                self._kill_all()
                if attempt == attempts - 1:
                    raise
                self.gcs_port, self.dashboard_port = free_port(), free_port()
                self.url = self.env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{self.dashboard_port}"
        return self

    def _start_nodes(self, timeout_s: float) -> LoopbackCluster:
        head = self._launch(0)
        self._wait(lambda: self.get("/api/version") is not None, timeout_s, "head node", [head])
        for index in range(1, len(self.node_cpus)):
            node = self._launch(index)
            self._wait(lambda n=index: len(self.alive_nodes()) > n, timeout_s, f"node {index}", [head, node])
        time.sleep(2)
        self._wait(lambda: head.poll() is None, 1, "head node (after the others)", [head])
        return self

    def _kill_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _launch(self, index: int) -> subprocess.Popen:
        log = open(self.root / f"node{index}.log", "a")
        proc = subprocess.Popen(
            self._node_command(index), env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def _wait(self, ready, timeout_s: float, what: str, watch: list[subprocess.Popen]) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [p.args for p in watch if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-2000:] for p in sorted(self.root.glob("node*.log")))
                raise RuntimeError(f"{what} did not come up (exited: {dead})\n{logs}")
            time.sleep(1.0)

    def get(self, path: str):
        """GET a dashboard route with the token: parsed JSON, or None if it does not answer."""
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return json.loads(answer.read())
        except (OSError, ValueError):
            return None

    def alive_nodes(self) -> list[str]:
        answer = self.get("/api/v0/nodes?limit=100") or {}
        rows = ((answer.get("data") or {}).get("result") or {}).get("result") or []
        return [n["node_id"] for n in rows if n.get("state") == "ALIVE"]

    def train_worker_nodes(self, submission_id: str) -> list[str]:
        """Node ids of the Ray Train workers of a submitted job (alive or finished)."""
        job = self.get(f"/api/jobs/{submission_id}") or {}
        query = "filter_keys=class_name&filter_predicates=%3D&filter_values=RayTrainWorker"
        answer = self.get(f"/api/v0/actors?limit=1000&detail=1&{query}") or {}
        rows = ((answer.get("data") or {}).get("result") or {}).get("result") or []
        return [a["node_id"] for a in rows if a.get("job_id") == job.get("job_id")]

    def stop(self) -> list[int]:
        """End every process this cluster started; the pids still alive afterwards (should be [])."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 8  # `ray start --block` can take long to exit: then SIGKILL
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            time.sleep(0.5)
        self._kill_all()
        for pid in self.leftover_pids():  # a Ray process that left its group: still ours by path
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        left = self.leftover_pids()
        if not left:
            shutil.rmtree(self.root, ignore_errors=True)
        return left

    def leftover_pids(self) -> list[int]:
        """Live processes whose command line names this cluster's temp dir."""
        mine = str(self.root).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if mine in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
        return pids
