"""The status words (sgkernels/ops/_status.py): one per (thread, device), so a thread sees its own
calls' errors and never another thread's, and none is lost."""
from __future__ import annotations

import threading

import pytest
import torch

from sgkernels.ops import _status

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_words_are_per_thread(device):
    """4 threads set their word (as a kernel would) on random calls and check after every call:
    every flagged call raises in its own thread, no other call does."""
    n_threads, n_calls = 4, 2000
    barrier = threading.Barrier(n_threads)
    results = [None] * n_threads

    def worker(k):
        gen = torch.Generator().manual_seed(100 + k)
        bad = (torch.rand(n_calls, generator=gen) < 0.5).tolist()
        lost = misattributed = 0
        barrier.wait()
        for is_bad in bad:
            word = _status.status_buffer(torch.device(device))
            if is_bad:
                word.bitwise_or_(_status.BAD_TARGET)
            try:
                _status.check_errors(device)
            except ValueError as e:
                assert "target" in str(e)
                misattributed += not is_bad
                continue
            lost += is_bad
        results[k] = (lost, misattributed)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [(0, 0)] * n_threads


def test_an_unchecked_error_stays_with_its_thread():
    """A thread that leaves an error unchecked does not pass it to another thread; it gets it later."""
    _status.check_errors()
    _status.status_buffer(torch.device("cpu")).bitwise_or_(_status.NEGATIVE_NUM_TO_MASK)
    seen = []

    def other():
        try:
            _status.check_errors()
            seen.append("clean")
        except ValueError:
            seen.append("raised")

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == ["clean"]
    with pytest.raises(ValueError, match="num_to_mask"):
        _status.check_errors("cpu")
    _status.check_errors("cpu")  # reset by the raise
