"""Training progress in the user's terminal, printed by the driver from what rank 0 sends.

Rank 0's RunTracker (p5ray/tracking.py) puts small dicts on a Ray queue; a thread of the driver
takes them and prints them, so the terminal gets exactly one copy whatever the number of workers:

    TTY, text format   an in-place step line (`\\r`), replaced by one line per epoch
    not a TTY          one plain line per epoch (no carriage returns)
    --log-format json  one JSON object per epoch, its numbers as fields
    --quiet            nothing
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time

log = logging.getLogger("p5ray.train")
SCORE = "valid/ndcg@10"
BAR = 24


def epoch_line(item: dict) -> str:
    """`epoch 3/20 | loss 9.1677 (recall 7.1550, rank 1.3863) | valid ndcg@10 0.0421 ... | 959 samples/s`."""
    m = item["metrics"]
    of = f"/{item['epochs']}" if item.get("epochs") else ""
    tasks = [f"{k[5:]} {v:.4f}" for k, v in m.items() if k.startswith("loss/") and k != "loss/total"]
    parts = [f"epoch {m['epoch']}{of}", f"loss {m.get('loss/total', math.nan):.4f}" + (f" ({', '.join(tasks)})" if tasks else "")]
    if SCORE in m:
        valid = f"valid ndcg@10 {m[SCORE]:.4f}"
        if "valid/hr@10" in m:
            valid += f" hr@10 {m['valid/hr@10']:.4f}"
        if "best/valid/ndcg@10" in m:
            valid += f" (best {m['best/valid/ndcg@10']:.4f})"
        parts.append(valid)
    if "samples_per_s" in m:
        parts.append(f"{m['samples_per_s']:.0f} samples/s")
    if "epoch_time_s" in m:
        parts.append(f"{m['epoch_time_s']:.1f} s")
    return " | ".join(parts)


def step_line(item: dict, width: int = BAR) -> str:
    """`epoch 3/20 [#########---------] 120/400 loss 7.1234 4.2 steps/s`."""
    done, total = item["step"], max(1, item["steps"])
    filled = int(width * done / total)
    of = f"/{item['epochs']}" if item.get("epochs") else ""
    rate = f" {item['steps_per_s']:.1f} steps/s" if item.get("steps_per_s") else ""
    loss = f" loss {item['loss']:.4f}" if item.get("loss") is not None else ""
    return f"epoch {item['epoch']}{of} [{'#' * filled}{'-' * (width - filled)}] {done}/{total}{loss}{rate}"


class ProgressPrinter:
    """Drains the progress queue on a driver thread and prints each item once (see module doc)."""

    def __init__(self, queue, stream=None):
        self.queue = queue
        self.stream = stream
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="p5ray-progress", daemon=True)
        self._partial = False  # an in-place step line is on screen

    @classmethod
    def start(cls) -> ProgressPrinter:
        from ray.util.queue import Queue

        printer = cls(Queue(maxsize=10000, actor_options={"num_cpus": 0}))
        printer._thread.start()
        return printer

    @property
    def interactive(self) -> bool:
        """In-place step lines: only on a terminal, in text format, not --quiet."""
        from p5ray.logs import json_mode

        stream = self.stream or sys.stderr
        return bool(getattr(stream, "isatty", lambda: False)()) and not json_mode() and log.isEnabledFor(logging.INFO)

    def handle(self, item: dict) -> None:
        if item.get("kind") == "step":
            if self.interactive:
                self._write("\r" + step_line(item) + "\x1b[K")
                self._partial = True
            return
        if item.get("kind") == "epoch":
            self._clear()
            m = item["metrics"]
            fields = {
                "event": "epoch", "epoch": m.get("epoch"), "epochs": item.get("epochs"),
                "metrics": {k: v for k, v in m.items() if _number(v)},
            }
            log.info("%s", epoch_line(item), extra={"fields": fields})

    def stop(self, timeout_s: float = 10.0) -> None:
        """Print what is still queued, then end the thread (call after trainer.fit() returns)."""
        self._stop.set()
        self._thread.join(timeout_s)
        self._clear()
        try:
            from ray.util.queue import Queue

            if isinstance(self.queue, Queue):
                import ray

                ray.kill(self.queue.actor)
        except Exception:  # the cluster is already gone: nothing to free
            pass

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                items = [self.queue.get(timeout=0.5)]
                items += self.queue.get_nowait_batch(self.queue.qsize()) if self.queue.qsize() else []
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception:  # the queue's actor is gone (Ray shut down): nothing more will come
                return
            for item in _latest_steps(items):
                try:
                    self.handle(item)
                except Exception:  # a malformed item never stops training
                    log.debug("bad progress item %r", item, exc_info=True)

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(text)
        stream.flush()

    def _clear(self) -> None:
        if self._partial:
            self._write("\r\x1b[K")
            self._partial = False


def _latest_steps(items: list[dict]) -> list[dict]:
    """Every epoch item, in order; of a run of step items only the last (the screen shows one)."""
    out = []
    for item in items:
        if out and item.get("kind") == "step" and out[-1].get("kind") == "step":
            out[-1] = item
        else:
            out.append(item)
    return out


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class StepClock:
    """Rate limit for step updates (rank 0 sends at most one every `interval_s`)."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.last = 0.0
        self.started = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.interval_s:
            return False
        self.last = now
        return True
