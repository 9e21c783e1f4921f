"""SelfGuidedSampler(cuda_graph=True): the whole step (passes + sampling op) captured per step index.

On CPU the CUDA-graph calls (``sgkernels.step_graphs._GRAPH_API``) are replaced by a stand-in that
records each captured callable and replays it by calling it again on the static buffers, so the
mechanism (static buffers, the seed tensor, one graph per step, replay order, no recapture for a new
seed) is checked against the eager loop without a GPU. A second stand-in runs the capture on fake
CUDA tensors (``FakeTensorMode``): the CUDA code path of the captured step must never read a device
value on the host (a sync, which a real capture rejects). The ``cuda`` tests run the real capture.
"""
import threading

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sgkernels as sgk
from sgkernels import step_graphs
from sgkernels._backend import triton_available
from sgkernels.ops import _status
from sgkernels.models import TOAST, MaskTransformer, MaskTransformerConfig
from sgkernels.sampler import SelfGuidedSampler

TINY = dict(codebook_size=16, num_classes=5, grid_size=4, width=32, depth=2, heads=4, mlp_dim=48)
STEPS = 4

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")


@pytest.fixture(autouse=True)
def _sampling_backend(request):
    """The fused C++ CPU kernel when this build has it, else the PyTorch reference (same semantics);
    the ``cuda`` tests keep the default (the Triton kernels)."""
    if request.node.get_closest_marker("cuda") is not None or torch._C._dispatch_has_kernel_for_dispatch_key(
            "sgkernels::self_guided_step", "CPU"):
        yield
    else:
        with sgk.use_backend("torch"):
            yield


def _models(device="cpu", **overrides):
    torch.manual_seed(0)
    cfg = MaskTransformerConfig(**{**TINY, **overrides})
    model, guide = MaskTransformer(cfg), TOAST(cfg, num_factors=4)
    model.reset_parameters(std=0.3)  # peaked logits, and a guide that matters
    guide.reset_parameters(std=0.3)
    return model.to(device).eval(), guide.to(device).eval()


class _Graph:
    def __init__(self, api, fn, pool):
        self.api, self.fn, self.pool = api, fn, pool

    def replay(self):
        self.api.replayed.append(self)
        self.fn()


class _RecordingGraphs:
    """Stand-in for the CUDA-graph calls: capture records ``fn`` (without running it, as a capture
    runs no kernel), replay calls it again."""

    device_type = "cpu"

    def __init__(self):
        self.captured, self.replayed, self.pools, self.warmed_up = [], [], [], 0
        self.streams, self.checked = [], []

    def pool(self, device):
        self.pools.append(object())
        return self.pools[-1]

    def warmup(self, fns, device):
        for fn in fns:
            fn()
        self.warmed_up += len(fns)

    def capture(self, fn, pool, device):
        self.captured.append(_Graph(self, fn, pool))
        return self.captured[-1]

    def after(self, previous, device):
        self.streams.append(previous)
        return f"stream {len(self.streams)}"

    def status_word(self, device):
        return torch.zeros(1, dtype=torch.int32)

    def raise_flagged(self, word):
        self.checked.append(word)


@pytest.fixture
def recording(monkeypatch):
    api = _RecordingGraphs()
    monkeypatch.setattr(step_graphs, "_GRAPH_API", api)
    return api


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5], ids=["guided", "guided+cfg"])
def test_graphed_loop_matches_eager(recording, cfg_scale):
    model, guide = _models()
    kw = dict(steps=STEPS, guidance_scale=1.0, choice_temperature=4.5, cfg_scale=cfg_scale)
    graphed = SelfGuidedSampler(model, guide, cuda_graph=True, **kw)
    eager = SelfGuidedSampler(model, guide, fused_head=False, **kw)
    captures = 0
    for batch in (2, 3):
        labels = torch.arange(batch) % model.config.num_classes
        results = {}
        for seed in (7, 8):
            results[seed] = got = graphed(labels, seed=seed)
            assert torch.equal(got, eager(labels, seed=seed))
            # T graphs per batch size, captured on its first call only: a new seed is a fill_
            captures += STEPS if seed == 7 else 0
            assert len(recording.captured) == captures
        assert not torch.equal(results[7], results[8])
        assert torch.equal(results[7], eager(labels, seed=7))  # the result is no view of a static buffer
    assert recording.warmed_up == 2 * STEPS
    # after each call, the status word of the graphs that ran is checked
    words = [g.status for g in graphed._graphs.values()]
    assert [id(w) for w in recording.checked] == [id(words[0])] * 2 + [id(words[1])] * 2
    assert len(recording.pools) == 2  # one pool per key, shared by its T graphs
    for i, g in enumerate(recording.captured):
        assert g.pool is recording.pools[i // STEPS]
    # replayed in capture order, once per step, 2 calls per batch size
    order = [recording.captured.index(g) for g in recording.replayed]
    assert order == [*range(4)] * 2 + [*range(4, 8)] * 2


def test_graph_state_callback_and_recapture(recording):
    model, guide = _models()
    graphed = SelfGuidedSampler(model, guide, steps=STEPS, cuda_graph=True)
    eager = SelfGuidedSampler(model, guide, steps=STEPS, fused_head=False)
    labels = torch.tensor([1, 4])
    seen_g, seen_e = [], []
    graphed(labels, seed=3, callback=lambda k, t, m: seen_g.append((k, t, m)))
    eager(labels, seed=3, callback=lambda k, t, m: seen_e.append((k, t.clone(), m.clone())))
    assert [k for k, _, _ in seen_g] == list(range(STEPS))
    for (_, tg, mg), (_, te, me) in zip(seen_g, seen_e):  # copies, not the static buffers
        assert torch.equal(tg, te) and torch.equal(mg, me)
    assert len(recording.captured) == STEPS
    graphed.guidance_scale = 2.0  # baked into the graphs: a new key, a new capture
    eager.guidance_scale = 2.0
    assert torch.equal(graphed(labels, seed=3), eager(labels, seed=3))
    assert len(recording.captured) == 2 * STEPS
    graphed.reset_graphs()
    assert torch.equal(graphed(labels, seed=3), eager(labels, seed=3))
    assert len(recording.captured) == 3 * STEPS


def test_step_graphs_replay_in_order(recording):
    model, guide = _models()
    graphed = SelfGuidedSampler(model, guide, steps=STEPS, cuda_graph=True)
    labels = torch.tensor([0, 2])
    graphed(labels, seed=1)
    (graphs,) = graphed._graphs.values()
    graphs.reset(labels, 1)
    with pytest.raises(RuntimeError, match="expected step 0, got 1"):
        graphs.replay(1)


def test_tensor_seed_step_matches_int_seed():
    """The step a graph captures, with its seed as a 0-dim int64 tensor: the int seed's tokens."""
    model, guide = _models()
    s = SelfGuidedSampler(model, guide, steps=STEPS, fused_head=False, cfg_scale=1.0)
    labels = torch.tensor([0, 3])
    cfg = model.config
    tokens = torch.full((2, cfg.num_tokens), cfg.mask_token_id, dtype=torch.int64)
    is_masked = torch.ones_like(tokens, dtype=torch.bool)
    a = b = (tokens, is_masked)
    with torch.no_grad():
        for k in range(STEPS):
            a = s.step(*a, labels, k, 11)
            b = s.step(*b, labels, k, torch.tensor(11))
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


class _NoRerun(_Graph):
    def replay(self):
        self.api.replayed.append(self)  # a replay runs no Python


class _FakeCudaGraphs(_RecordingGraphs):
    """Stand-in on fake CUDA tensors: Python runs at warm-up and capture only, as with real graphs."""

    device_type = "cuda"

    def capture(self, fn, pool, device):
        fn()  # a capture runs the Python once (on fake tensors: a host read of a value raises)
        self.captured.append(_NoRerun(self, fn, pool))
        return self.captured[-1]

    def status_word(self, device):
        return _status.status_buffer(device)


@pytest.mark.skipif(not triton_available(), reason="the op's CUDA kernel is Triton's")
@pytest.mark.parametrize("preset,cfg_scale,guidance", [("unlockmgm", 0.0, 1.0), ("maskgit", 1.5, 1.0),
                                                       ("unlockmgm", 1.5, 0.0)])
def test_captured_step_has_no_host_sync_on_the_cuda_path(monkeypatch, preset, cfg_scale, guidance):
    """The whole graphed loop on fake CUDA tensors (no GPU needed): the model's and the ops' CUDA
    branches, the mask counts, the seed tensor; any ``.item()`` / ``bool(tensor)`` on a device value
    raises there (DataDependentOutputException), as a sync would abort a real capture."""
    api = _FakeCudaGraphs()
    monkeypatch.setattr(step_graphs, "_GRAPH_API", api)
    monkeypatch.setattr(_status, "_local", threading.local())  # the fake status word stays here
    model, guide = _models()  # fresh modules: moving them under the fake mode makes their parameters fake
    with FakeTensorMode(allow_non_fake_inputs=True), sgk.use_backend("auto"):  # CUDA tensors: the Triton op
        model, guide = model.to("cuda"), guide.to("cuda")
        assert isinstance(next(model.parameters()), torch._subclasses.FakeTensor)
        s = SelfGuidedSampler(model, guide, steps=STEPS, preset=preset, cfg_scale=cfg_scale,
                              guidance_scale=guidance, cuda_graph=True)
        labels = torch.tensor([0, 3, 4], device="cuda")
        with torch.no_grad():
            for seed in (5, 6):
                out, _ = s._graphs.loop(s, labels, seed, range(STEPS), None)
    assert out.shape == (3, model.config.num_tokens) and out.device.type == "cuda"
    assert len(api.captured) == STEPS and api.warmed_up == STEPS and len(api.replayed) == 2 * STEPS
    assert api.streams == [None, "stream 1"]  # the second sample is ordered after the first
    (graphs,) = s._graphs.values()
    assert graphs.status is not None and graphs.status.device.type == "cuda"  # the word the kernels write


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5], ids=["guided", "guided+cfg"])
def test_cuda_graph_matches_eager_on_gpu(size, cfg_scale):
    """The real capture: cuda_graph=True gives cuda_graph=False's tokens, for two seeds, no recapture."""
    over = {} if size == "tiny" else dict(codebook_size=300, grid_size=8, width=64, mlp_dim=128)
    model, guide = _models("cuda", **over)
    kw = dict(steps=6, guidance_scale=1.0, choice_temperature=4.5, cfg_scale=cfg_scale)
    graphed = SelfGuidedSampler(model, guide, cuda_graph=True, **kw)
    eager = SelfGuidedSampler(model, guide, fused_head=False, **kw)
    labels = torch.tensor([0, 3, 4], device="cuda")
    results = []
    for seed in (0, 1):
        got = graphed(labels, seed=seed)
        assert torch.equal(got, eager(labels, seed=seed))
        results.append(got)
        (graphs,) = graphed._graphs.values()
        assert len(graphs.graphs) == 6
        assert isinstance(graphs.graphs[0], torch.cuda.CUDAGraph)
    assert not torch.equal(results[0], results[1])
    assert torch.equal(graphed(labels[:2], seed=0), eager(labels[:2], seed=0))
    assert len(graphed._graphs) == 2
    with sgk.use_backend("torch"), pytest.raises(ValueError, match="cuda_graph=True needs the sampling op's CUDA"):
        SelfGuidedSampler(model, guide, cuda_graph=True, **kw)(labels, seed=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_raises_flagged_errors_in_any_thread():
    """NaN logits flagged by the graphed kernels are raised after the loop, also when the graphs
    (captured by this thread, writing its status word) are replayed by another thread."""
    model, guide = _models("cuda")
    graphed = SelfGuidedSampler(model, guide, steps=3, cuda_graph=True)
    labels = torch.tensor([0, 3], device="cuda")
    graphed(labels, seed=0)  # captured here, no error
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")  # in place: the graphs read it
    with pytest.raises(ValueError, match="NaN"):
        graphed(labels, seed=1)
    errors = []

    def worker():
        try:
            graphed(labels, seed=2)
        except ValueError as e:
            errors.append(e)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "NaN" in str(errors[0])
    sgk.check_errors()
