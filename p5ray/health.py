"""Replica health for the task deployments: a replica whose requests hang is reported and replaced.

Serve calls a deployment's `check_health` every `health_check_period_s`; an exception three times
in a row, or no answer within `health_check_timeout_s`, and Serve replaces the replica. A replica
whose event loop is blocked misses the timeout. One whose requests hang while its loop runs (a
wedged thread, a batch that never returns) is caught by RequestClock: requests in flight and none
finished for `stall_timeout_s` makes check_health fail.
"""

import functools
import inspect
import threading
import time
from contextlib import contextmanager

HEALTH = {"health_check_period_s": 5.0, "health_check_timeout_s": 30.0}


class RequestClock:
    """Requests in flight in one replica, and when the replica last made progress."""

    def __init__(self, stall_timeout_s: float):
        self.stall_timeout_s = stall_timeout_s
        self.in_flight = 0
        self.progress = time.monotonic()  # the last finished request, or the start of a busy spell
        self._lock = threading.Lock()  # sync request methods run on Serve's thread pool

    @contextmanager
    def request(self):
        with self._lock:
            if not self.in_flight:
                self.progress = time.monotonic()
            self.in_flight += 1
        try:
            yield
        finally:  # also when the client went away and Serve cancelled the request
            with self._lock:
                self.in_flight -= 1
                self.progress = time.monotonic()

    def stalled_for(self) -> float:
        """Seconds with requests in flight and none finished (0 when idle)."""
        return time.monotonic() - self.progress if self.in_flight else 0.0


def timed(method):
    """Count a request method's calls in the replica's RequestClock (read by check_health)."""
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def run_async(self, *args, **kwargs):
            with self.clock.request():
                return await method(self, *args, **kwargs)
        return run_async

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.clock.request():
            return method(self, *args, **kwargs)
    return run
