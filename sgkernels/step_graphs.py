"""Whole-step CUDA graphs of :class:`~sgkernels.SelfGuidedSampler` (``cuda_graph=True``).

One graph per step index, each the whole of ``sampler.step`` (model passes and the sampling op) on
static token / mask / label buffers, the seed read by the kernels from a 0-dim int64 device tensor:
a sample is a ``fill_`` of the seed and T graph launches, and a new seed never recaptures.

* :class:`_CudaGraphAPI` holds every CUDA-graph call (the CPU tests replace :data:`_GRAPH_API`);
* :class:`StepGraphs` is one captured set (one batch size, device and settings);
* :class:`StepGraphCache` is a sampler's sets, keyed by what is baked into them, and its loop.
"""
from __future__ import annotations

import threading

import torch

from .ops import _status


class _CudaGraphAPI:
    """The CUDA-graph calls of :class:`~sgkernels.SelfGuidedSampler` (``cuda_graph=True``), in one place.

    A seam: the CPU tests swap :data:`_GRAPH_API` for a stand-in that records the captured
    callables and replays them by calling them again, so the capture logic (static buffers, the seed
    tensor, one graph per step, replay order) is exercised without a GPU.
    """

    device_type = "cuda"

    def pool(self, device: torch.device):
        """A memory pool shared by the graphs of one key (they replay one after the other)."""
        with torch.cuda.device(device):
            return torch.cuda.graph_pool_handle()

    def warmup(self, fns, device: torch.device) -> None:
        """Run each of ``fns`` once on a side stream, outside any capture: Triton JIT compiles,
        cuBLAS handles and workspaces, the ops' status word are created here, not inside a capture."""
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for fn in fns:
                fn()
        current.wait_stream(side)

    def capture(self, fn, pool, device: torch.device):
        """``fn()`` captured into a new graph allocating from ``pool``: an object with ``replay()``."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, pool=pool):
            fn()
        return graph

    def after(self, previous, device: torch.device):
        """Order the current stream after ``previous`` (the stream of the last use of the static
        buffers, or None) and return it: a call from a thread on another stream must not overwrite
        them while the last one's work is queued."""
        stream = torch.cuda.current_stream(device)
        if previous is not None and previous != stream:
            stream.wait_stream(previous)
        return stream

    def status_word(self, device: torch.device) -> torch.Tensor:
        """The status word the captured kernels write: this thread's (the warm-up created it)."""
        return _status.status_buffer(device)

    def raise_flagged(self, word: torch.Tensor) -> None:
        """Raise the errors the graphs' kernels flagged in ``word`` (and clear it), as :func:`check_errors`."""
        torch.cuda.synchronize(word.device)
        flags = int(word.item())
        if flags:
            word.zero_()
            _status._raise_flags(word.device, flags)


_GRAPH_API = _CudaGraphAPI()
_CAPTURE_LOCK = threading.Lock()


class StepGraphs:
    """One graph per step index of a :class:`~sgkernels.SelfGuidedSampler`, for one batch size and device.

    Graph ``k`` is ``sampler.step`` at step ``k`` (model passes and sampling op: its
    choice temperature, mask count rule and offset ``k`` are baked in as Python scalars) on the
    static buffers: it reads ``tokens`` / ``is_masked`` / ``labels`` / ``seed`` (a 0-dim int64 tensor
    the kernels read at replay) and ends by copying the new tokens and mask into ``tokens`` /
    ``is_masked``, where graph ``k + 1`` reads them. The T graphs share one memory pool; they are
    captured in step order and must be replayed in that order (:meth:`replay` checks it).

    The kernels flag bad input in the status word of the thread that captured them (the graphs
    keep it alive): :meth:`raise_flagged` reads that one, whichever thread replays. One sample at a
    time uses the buffers (:attr:`lock`; across streams, :meth:`_CudaGraphAPI.after`).
    """

    def __init__(self, sampler, batch: int, device: torch.device):
        cfg = sampler.model.config
        self.tokens = torch.full((batch, cfg.num_tokens), cfg.mask_token_id, dtype=torch.int64, device=device)
        self.is_masked = torch.ones((batch, cfg.num_tokens), dtype=torch.bool, device=device)
        self.labels = torch.zeros(batch, dtype=torch.int64, device=device)
        self.seed = torch.zeros((), dtype=torch.int64, device=device)
        self.mask_token_id = cfg.mask_token_id
        self.graphs: list = []
        self.status = None  # the status word the captured kernels write
        self.lock = threading.Lock()
        self._stream = None  # the stream of the last sample
        self._next = 0

    @classmethod
    def capture(cls, sampler, batch: int, device: torch.device) -> StepGraphs:
        """Warm up every step on the static buffers, then capture steps 0 .. T-1 in order.

        The caller holds ``torch.no_grad()`` and the modules in eval mode (both are baked in).
        """
        self = cls(sampler, batch, device)

        def body(k):  # pure: reads the static buffers, writes nothing of theirs
            return sampler.step(self.tokens, self.is_masked, self.labels, k, self.seed)

        def graphed(k):
            def fn():
                tokens, is_masked = body(k)
                self.tokens.copy_(tokens)
                self.is_masked.copy_(is_masked)
            return fn

        _GRAPH_API.warmup([lambda k=k: body(k) for k in range(sampler.steps)], device)
        self.status = _GRAPH_API.status_word(device)
        pool = _GRAPH_API.pool(device)
        self.graphs = [_GRAPH_API.capture(graphed(k), pool, device) for k in range(sampler.steps)]
        return self

    def reset(self, labels: torch.Tensor, seed: int) -> None:
        """Start a sample: all positions masked, ``labels`` and ``seed`` copied in (no host sync, no capture)."""
        self._stream = _GRAPH_API.after(self._stream, self.tokens.device)
        self.tokens.fill_(self.mask_token_id)
        self.is_masked.fill_(True)
        self.labels.copy_(labels)
        self.seed.fill_(seed)
        self._next = 0

    def replay(self, step: int) -> None:
        """Replay graph ``step``: the static buffers advance by one step."""
        if step != self._next:
            raise RuntimeError(f"step graphs replay in order: expected step {self._next}, got {step}")
        self.graphs[step].replay()
        self._next = step + 1

    def raise_flagged(self) -> None:
        """Raise what the graphs' kernels flagged (a host sync: once, after the loop)."""
        _GRAPH_API.raise_flagged(self.status)


class StepGraphCache(dict):
    """A sampler's captured :class:`StepGraphs`, keyed by :func:`graph_key` (``clear()`` drops them all)."""

    def get_or_capture(self, sampler, labels: torch.Tensor) -> StepGraphs:
        """The captured step graphs for ``labels``' batch size (captured on first use)."""
        b, device = labels.shape[0], labels.device
        key = graph_key(sampler, b, device)
        with _CAPTURE_LOCK:  # one capture at a time in the process (a capture forbids others' CUDA calls)
            graphs = self.get(key)
            if graphs is None:
                graphs = self[key] = StepGraphs.capture(sampler, b, device)
        return graphs

    def loop(self, sampler, labels: torch.Tensor, seed: int, steps, callback) -> tuple[torch.Tensor, StepGraphs]:
        """The sampling loop as replays of the captured step graphs: no host work per step but a launch.

        Returns the tokens and the graphs (whose :meth:`StepGraphs.raise_flagged` the caller calls)."""
        graphs = self.get_or_capture(sampler, labels)
        with graphs.lock:
            graphs.reset(labels, seed)
            for step in steps:
                graphs.replay(step)
                if callback is not None:  # the static buffers are overwritten by the next replay
                    callback(step, graphs.tokens.clone(), graphs.is_masked.clone())
            return graphs.tokens.clone(), graphs


def graph_key(sampler, batch: int, device: torch.device) -> tuple:
    """What a captured set of step graphs depends on besides the weights' memory: the batch size,
    the device and every setting baked into the graphs as a Python scalar."""
    s = sampler
    return (batch, device, s.guided, s.cfg_scale, s.steps, s.guidance_scale, s.temperature,
            s.choice_temperature, s.temperature_decay, s.mask_rounding, s.at_least_one,
            s.decoded_confidence, s.tie_rule, None if s.compile is None else repr(sorted(s.compile.items())))


def check_graph_device(device: torch.device) -> None:
    """Refuse ``cuda_graph=True`` for a model that is not on the graph API's device type."""
    if device.type != _GRAPH_API.device_type:
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
