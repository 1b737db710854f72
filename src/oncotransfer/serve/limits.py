"""What the service admits: a bounded queue of /predict requests, a budget of decoded bytes, a time limit.

A request is admitted (counted) from the moment its headers arrive until its work has finished, so a timed-out
inference that is still running keeps its place: a slow model cannot pile up threads behind a 504. Beyond
``max_concurrent`` running + ``max_queue`` waiting (uploading or queued) the answer is 503 with Retry-After.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

from oncotransfer.data.readers import MAX_PIXELS
from oncotransfer.errors import ConfigError
from oncotransfer.runtime import usable_cores

T = TypeVar("T")


@dataclass(frozen=True)
class ServeLimits:
    """The service's limits (``serve`` options of the same names)."""
    max_concurrent: int | None = None  # inferences at once; None: one per usable core
    max_queue: int = 16  # /predict requests waiting (uploading or queued) beyond the running ones
    timeout_s: float = 30.0  # from the end of the upload to the answer (queue wait + decode + inference)
    max_pixels: int = MAX_PIXELS  # declared width x height above which an image is refused before decoding
    max_decode_mb: float = 1024.0  # estimated decoded bytes of the admitted requests, all together
    header_timeout_s: float = 10.0  # a request's headers must arrive within this (slowloris)
    body_timeout_s: float = 60.0  # and its body within this after the headers
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this

    def __post_init__(self) -> None:
        # typer's min= lets nan, inf and (for fields without one) negatives through; each would fail deep inside
        # (int(nan) in the gate, wait_for(nan)) or switch a limit off.
        for option, value, low in (("--timeout", self.timeout_s, 0), ("--max-decode-mb", self.max_decode_mb, 0),
                                   ("--header-timeout", self.header_timeout_s, 0),
                                   ("--body-timeout", self.body_timeout_s, 0), ("keep_alive_s", self.keep_alive_s, 0),
                                   ("--max-pixels", self.max_pixels, 0), ("--max-queue", self.max_queue, -1),
                                   ("--max-concurrent", 1 if self.max_concurrent is None else self.max_concurrent, 0)):
            check_limit(option, value, low)

    def concurrency(self) -> int:
        if self.max_concurrent is not None:
            return max(1, int(self.max_concurrent))
        return max(1, usable_cores())


def check_limit(option: str, value: float, low: float = 0) -> None:
    """A finite number above ``low`` and at most 1e12 (larger: a typo that switches the limit off), else a
    one-line ConfigError."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and low < value <= 1e12):
        raise ConfigError(f"{option} {value}: expected a number {'of 0 or more' if low < 0 else 'above 0'} "
                          "(and at most 1e12)")


class Ticket:
    """One admitted request. Held by the HTTP side and, once submitted, by its worker; the place (and the
    bytes reserved for decoding) are given back when both have let go."""

    def __init__(self, gate: "Gate"):
        self._gate = gate
        self._holds = 1
        self.reserved = 0

    def retain(self) -> None:
        with self._gate._lock:
            self._holds += 1

    def release(self) -> None:
        with self._gate._lock:
            self._holds -= 1
            if self._holds == 0:
                self._gate.admitted -= 1
                self._gate.reserved -= self.reserved
                self.reserved = 0


class Gate:
    """Admission control, the decoded-bytes budget and the worker threads of /predict."""

    def __init__(self, max_concurrent: int, max_queue: int, budget_bytes: int):
        self.max_concurrent = max_concurrent
        self.max_queue = max(0, max_queue)
        self.budget = budget_bytes
        self.admitted = 0  # requests between their headers and the end of their work
        self.running = 0  # of which in a worker thread now
        self.reserved = 0  # decoded bytes promised to admitted requests
        self._lock = threading.Lock()
        self._mean_s = 0.1  # moving mean of a request's work, for Retry-After
        self.executor = ThreadPoolExecutor(max_concurrent, thread_name_prefix="predict")

    @property
    def capacity(self) -> int:
        return self.max_concurrent + self.max_queue

    def admit(self) -> Ticket | None:
        with self._lock:
            if self.admitted >= self.capacity:
                return None
            self.admitted += 1
        return Ticket(self)

    def reserve(self, ticket: Ticket, nbytes: int) -> bool:
        """Promise ``nbytes`` of decoding memory to ``ticket``; False when the budget is spent."""
        with self._lock:
            if self.reserved + nbytes > self.budget:
                return False
            self.reserved += nbytes
            ticket.reserved += nbytes
            return True

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead divided among the workers."""
        with self._lock:
            ahead = max(1, self.admitted - self.max_concurrent + 1)
            return max(1, math.ceil(self._mean_s * ahead / self.max_concurrent))

    async def run(self, ticket: Ticket, fn: Callable[[], T], deadline: float) -> T:
        """``fn()`` in a worker thread; asyncio.TimeoutError at ``deadline`` (time.monotonic). A call still
        queued then is dropped; one already running finishes in the background, holding its place."""
        def work() -> T:
            t0 = time.perf_counter()
            with self._lock:
                self.running += 1
            try:
                return fn()
            finally:
                with self._lock:
                    self.running -= 1
                    self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - t0)
        ticket.retain()
        future = self.executor.submit(work)
        future.add_done_callback(lambda _: ticket.release())
        # wrap_future passes the cancel of wait_for's timeout on to the executor's future (queued: dropped).
        return await asyncio.wait_for(asyncio.wrap_future(future), max(0.0, deadline - time.monotonic()))

    def load(self) -> dict:
        with self._lock:
            return {"running": self.running, "waiting": max(0, self.admitted - self.running),
                    "max_concurrent": self.max_concurrent, "max_queue": self.max_queue,
                    "decode_budget_mb": round(self.budget / 2**20), "decode_reserved_mb": round(self.reserved / 2**20, 1)}

    def ready(self) -> bool:
        with self._lock:
            return self.admitted < self.capacity
