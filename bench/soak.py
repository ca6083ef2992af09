"""Soak: a fixed request rate against the combined /v1/recommend for a bounded time, on loopback.

    python bench/soak.py --checkpoint CKPT --rate 10 --duration 120     # starts `p5ray serve`
    python bench/soak.py --url http://127.0.0.1:8000 --rate 10 --duration 120

The load is open-loop: request i is sent at start + i / rate whether or not earlier ones have
answered, so a slow or failing server cannot slow the load down and hide it. Every answer that is
not a 200 (or no answer within --timeout) is an error. The resident memory (RSS) of every serving
process is read at evenly spaced moments of the load: the `p5ray serve` process and all its descendants
(Ray's raylet and GCS, the Serve controller, proxy and every replica). Prints one JSON object;
exits 1 on any error. tests/test_faults_serve.py runs a 10-second version and reuses `open_loop`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Answer:
    sent_s: float  # when it was sent, seconds after the start of the load
    latency_s: float
    status: int | None  # HTTP status; None when no answer came (timeout, connection error)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


def body(i: int, users: int = 20) -> dict:
    """Request i: user u1..u20 in turn (the users of tests.helpers.make_checkpoint)."""
    return {"user_id": f"u{i % users + 1}", "k": 10}


def bodies_of(checkpoint: str, users: int = 200):
    """Request i for a real checkpoint: its first `users` known users in turn (the warm path:
    recall -> rank -> cross-sell, not the cold-start shortcut)."""
    import pyarrow.parquet as pq

    ids = pq.read_table(Path(checkpoint) / "users.parquet", columns=["user_id"]).column("user_id").to_pylist()[:users]
    return lambda i: {"user_id": ids[i % len(ids)], "k": 10}


async def open_loop(url: str, rate: float, duration_s: float, route: str = "/v1/recommend",
                    make_body=body, timeout_s: float = 30.0, stop: asyncio.Event | None = None) -> list[Answer]:
    """Send `rate` requests a second for `duration_s` (request i at i / rate), or until `stop` is
    set; every answer."""
    import httpx

    answers: list[Answer] = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()

        async def one(i: int):
            sent = time.perf_counter()
            try:
                response = await client.post(route, json=make_body(i))
                status, error = response.status_code, "" if response.status_code == 200 else response.text[:200]
            except httpx.HTTPError as exc:
                status, error = None, f"{type(exc).__name__}: {exc}"[:200]
            answers.append(Answer(sent - start, time.perf_counter() - sent, status, error))

        tasks = []
        for i in range(int(rate * duration_s)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if stop is not None and stop.is_set():
                break
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return sorted(answers, key=lambda a: a.sent_s)


def summary(answers: list[Answer]) -> dict:
    ok = sorted(a.latency_s for a in answers if a.ok)
    pick = lambda q: round(ok[min(len(ok) - 1, int(q * len(ok)))] * 1000, 1) if ok else None  # noqa: E731
    errors: dict[str, int] = {}
    for a in answers:
        if not a.ok:
            key = str(a.status) if a.status is not None else a.error.split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    return {"requests": len(answers), "errors": sum(errors.values()), "errors_by_kind": errors,
            "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": round(ok[-1] * 1000, 1) if ok else None}


# -- memory of the serving processes -------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def process_name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [w.decode(errors="replace") for w in argv if w]
    named = [w for w in words if w.startswith("ray::")]  # Ray names its actor processes
    if named:
        return named[0].split(".")[0]
    if not words:
        return "?"
    if "-m" in words[:3]:
        return f"python -m {words[words.index('-m') + 1]}"
    scripts = [Path(w).name for w in words[1:3] if w.endswith(".py")]
    return scripts[0] if scripts else Path(words[0]).name


def descendants(root: int) -> list[int]:
    """`root` and every process below it (from /proc: no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def serve_actor_pids() -> list[int]:
    """Pids of the Serve controller, proxies and replicas of the Ray this process is connected to."""
    from ray._private.state import actors

    return sorted(a["Pid"] for a in actors(actor_state_name="ALIVE").values()
                  if a["Pid"] and (a["ActorClassName"].startswith(("ServeReplica", "ServeController", "ProxyActor"))))


def memory(pids: list[int]) -> dict[int, dict]:
    return {pid: {"name": process_name(pid), "rss_mb": round(rss / 2**20, 1)}
            for pid in pids if (rss := rss_bytes(pid)) is not None}


def memory_change(series: list[dict[int, dict]]) -> list[dict]:
    """Per process alive at the first and last reading: RSS at each reading (MB) and the growth
    over the whole load and over its second half (a leak grows in both; warm-up in the first)."""
    first, last, half = series[0], series[-1], series[len(series) // 2]
    rows = []
    for pid in sorted(first):
        if pid not in last:
            continue
        rss = [reading.get(pid, {}).get("rss_mb") for reading in series]
        rows.append({"pid": pid, "name": first[pid]["name"], "rss_mb": rss,
                     "growth_mb": round(last[pid]["rss_mb"] - first[pid]["rss_mb"], 1),
                     "second_half_growth_mb": round(last[pid]["rss_mb"] - half.get(pid, last[pid])["rss_mb"], 1)})
    return rows


def soak(url: str, rate: float, duration_s: float, pids, warmup_s: float = 5.0, make_body=body,
         readings: int = 5) -> dict:
    """Warm up, then the load, with the RSS of every serving process read `readings` times,
    evenly from its start to its end: the whole report. `pids()` lists the serving processes (a
    process that died or appeared during the load shows as such)."""
    asyncio.run(open_loop(url, rate, warmup_s, make_body=make_body))
    series = [memory(pids())]
    done = threading.Event()

    def read_memory():
        for _ in range(readings - 2):
            if done.wait(duration_s / (readings - 1)):
                return
            series.append(memory(pids()))

    reader = threading.Thread(target=read_memory, daemon=True)
    reader.start()
    answers = asyncio.run(open_loop(url, rate, duration_s, make_body=make_body))
    done.set()
    reader.join()
    series.append(memory(pids()))
    start, end = series[0], series[-1]
    report = {"url": url, "rate_per_s": rate, "duration_s": duration_s, **summary(answers),
              "memory": memory_change(series),
              "processes_gone": sorted(set(start) - set(end)), "processes_new": sorted(set(end) - set(start))}
    report["serving_rss_mb"] = [round(sum(p["rss_mb"][i] or 0 for p in report["memory"]), 1) for i in range(len(series))]
    return report


# -- the standalone run --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str, timeout_s: float = 900) -> tuple[subprocess.Popen, str]:
    """`p5ray serve` in a subprocess (its own local Ray); its URL once it printed `http: URL`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([sys.executable, "-m", "p5ray.cli", "serve", "--checkpoint", checkpoint,
                                "--http-port", str(free_port()), "--grpc-port", str(free_port())],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + timeout_s
    for line in process.stdout:
        if line.startswith("http: "):
            return process, line.split(" ", 1)[1].strip()
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError(f"p5ray serve did not print its address (exit {process.wait()})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="start `p5ray serve` on this checkpoint")
    parser.add_argument("--url", help="or soak a server that is already running (RSS: not measured)")
    parser.add_argument("--rate", type=float, default=10.0, help="requests a second")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--readings", type=int, default=5, help="RSS readings, evenly over the load")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args(argv)
    if bool(args.checkpoint) == bool(args.url):
        parser.error("give --checkpoint or --url")
    process = None
    make_body = bodies_of(args.checkpoint) if args.checkpoint else body
    if args.checkpoint:
        process, url = start_server(args.checkpoint)
        pids = lambda: descendants(process.pid)  # noqa: E731
    else:
        url, pids = args.url, list
    try:
        report = soak(url, args.rate, args.duration, pids, make_body=make_body, readings=max(2, args.readings))
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)  # the serve verb shuts Serve and its Ray down
            process.wait(timeout=120)
    report.update(machine=f"{platform.node()} {os.cpu_count()} CPUs", load_avg=os.getloadavg()[0],
                  date=time.strftime("%Y-%m-%d %H:%M"))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
