"""Where the time of a call goes: :class:`PartTimer` times module forwards and code sections by part.

Used by ``sgkernels bench sampler`` / ``dllm`` in one instrumented call per implementation, apart
from the timed calls: a forward hook pair on each module (the backbone, the guide, a language
model) reads the clock at the outermost call's entry and exit, with the device synchronised, so a
part is the wall time of its forwards; what a section takes besides its modules' forwards is the
rest of the step (the sampling op on the fused paths, the eager step on the stock ones).
"""
from __future__ import annotations

import collections
import contextlib
import time

from .timing import sync


class PartTimer:
    """Accumulated ms and call counts per part name. Nested forwards count once, in the outermost part."""

    def __init__(self, device):
        self.device = device
        self.ms: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()
        self._depth = 0
        self._t0 = 0.0
        self._handles: list = []

    def attach(self, module, part: str) -> "PartTimer":
        """Time ``module``'s forwards as ``part`` (until :meth:`detach`)."""
        def pre(mod, args):
            if self._depth == 0:
                sync(self.device)
                self._t0 = time.perf_counter()
            self._depth += 1

        def post(mod, args, out):
            self._depth -= 1
            if self._depth == 0:
                sync(self.device)
                self.ms[part] += (time.perf_counter() - self._t0) * 1e3
                self.calls[part] += 1

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post, always_call=True)]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def section(self, part: str):
        """Time the ``with`` body as ``part`` (device synchronised at both ends)."""
        sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.ms[part] += (time.perf_counter() - t0) * 1e3
            self.calls[part] += 1

    def __enter__(self) -> "PartTimer":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()
