"""infer.slides.prefetch: batches come in order from a reader thread whose set-up never touches the caller's."""
from __future__ import annotations

import os
import sys
import threading

import pytest

from oncotransfer.infer.slides import prefetch
from oncotransfer.runtime import BACKGROUND_NICE, yield_to_engine


def test_batches_keep_their_order_and_init_runs_in_the_reader_thread():
    seen = []
    out = list(prefetch(iter(range(7)), depth=2, init=lambda: seen.append(threading.get_ident())))
    assert out == list(range(7))
    assert seen and seen[0] != threading.get_ident()


def test_an_error_in_the_batches_reaches_the_caller():
    def broken():
        yield 1
        raise ValueError("damaged batch")
    with pytest.raises(ValueError, match="damaged batch"):
        list(prefetch(broken()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_reader_threads_yield_to_the_engine_and_the_caller_keeps_its_priority():
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    niceness = []

    def batches():
        niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        yield 0
    list(prefetch(batches(), init=yield_to_engine))
    assert niceness == [max(before, BACKGROUND_NICE)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
