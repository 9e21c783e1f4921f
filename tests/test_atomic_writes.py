"""Writes that survive a kill at any point: model checkpoints, training step directories, log.jsonl;
and the one-line checks of loaded state dicts (non-finite values, long mismatch lists).

A kill is simulated in-process: the N-th ``os.rename`` / ``os.replace`` raises :class:`Killed` (a
BaseException, as a signal would stop the process there) and every clean-up (``shutil.rmtree``,
``os.unlink``) is disabled while the killed call runs, so nothing is tidied that a kill would leave.
"""
import json
import os
import shutil

import pytest
import torch

from sgkernels import _io
from sgkernels.models.checkpoint import load_checkpoint, save_checkpoint
from sgkernels.models.pretrained import from_pretrained
from sgkernels.training import train_guide
from sgkernels.training import checkpoints as train_checkpoints
from sgkernels.training.checkpoints import latest_checkpoint, load_train_checkpoint, step_dirs
from test_train import build, fast_config, random_data, state_of, states_equal


class Killed(BaseException):
    pass


def killed_at(monkeypatch, n: int):
    """Patch renames to raise Killed at the n-th call and clean-ups to do nothing; returns the call counter."""
    calls = [0]
    real_rename, real_replace = os.rename, os.replace

    def counting(real):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                raise Killed
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(os, "rename", counting(real_rename))
    monkeypatch.setattr(os, "replace", counting(real_replace))
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)
    monkeypatch.setattr(os, "unlink", lambda *a, **k: None)
    return calls


def test_checkpoint_overwrite_killed_at_every_rename_keeps_config_and_weights_together(tmp_path, monkeypatch):
    """Overwrite a checkpoint with one of another width; a kill at any rename leaves the old or the new one."""
    old_model, old_guide = build(seed=0, width=32)
    new_model, new_guide = build(seed=1, width=16, heads=2)
    old, new = (state_of(old_model), state_of(old_guide)), (state_of(new_model), state_of(new_guide))
    n, outcomes = 1, set()
    while True:
        d = tmp_path / f"run{n}" / "ckpt"
        save_checkpoint(d, old_model, old_guide)
        with monkeypatch.context() as m:
            calls = killed_at(m, n)
            try:
                save_checkpoint(d, new_model, new_guide)
                finished = True
            except Killed:
                finished = False
        for load in (load_checkpoint, from_pretrained):  # both finish an interrupted swap first
            model, guide = load(d)
            got = (state_of(model), state_of(guide))
            is_old = states_equal(got[0], old[0]) and states_equal(got[1], old[1])
            is_new = states_equal(got[0], new[0]) and states_equal(got[1], new[1])
            assert is_old or is_new, f"kill at rename {n}: a mixture"
            outcomes.add("old" if is_old else "new")
        # the next save removes what the killed one left
        save_checkpoint(d, new_model, new_guide)
        assert sorted(os.listdir(d.parent)) == ["ckpt"]
        assert states_equal(state_of(load_checkpoint(d)[0]), new[0])
        if finished:
            assert calls[0] < n
            break
        n += 1
    assert outcomes == {"old", "new"} and n >= 3


def test_checkpoint_keeps_other_files_and_removes_stale_weights(tmp_path):
    model, guide = build(seed=0)
    save_checkpoint(tmp_path / "c", model, guide, format="torch")
    (tmp_path / "c" / "README.md").write_text("notes")
    (tmp_path / "c" / "extra").mkdir()
    (tmp_path / "c" / "extra" / "a.txt").write_text("a")
    save_checkpoint(tmp_path / "c", model, None, format="safetensors")
    assert sorted(os.listdir(tmp_path / "c")) == ["README.md", "config.json", "extra", "model.safetensors"]
    assert (tmp_path / "c" / "extra" / "a.txt").read_text() == "a"
    assert load_checkpoint(tmp_path / "c")[1] is None
    with pytest.raises(NotADirectoryError):
        save_checkpoint(tmp_path / "c" / "README.md", model)


def test_training_killed_while_pruning_leaves_only_complete_step_dirs(tmp_path, monkeypatch):
    backbone, guide = build(seed=0)
    tokens, labels = random_data(backbone.config, 8)
    config = fast_config(steps=4, save_every=1, keep_last=2)
    real_rmtree = shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs):  # deletes one file of the directory, then the process dies
        os.remove(os.path.join(path, "state.pt"))
        raise Killed

    monkeypatch.setattr(train_checkpoints.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(Killed):
        train_guide(backbone, guide, [(tokens, labels)], config, tmp_path, save_final=False)
    monkeypatch.setattr(train_checkpoints.shutil, "rmtree", real_rmtree)
    dirs = step_dirs(str(tmp_path))
    assert [s for s, _ in dirs] == [2, 3]
    for step, path in dirs:
        assert load_train_checkpoint(path)["step"] == step
    # resuming finishes the run and removes the half-deleted temporary
    backbone, guide = build(seed=0)
    result = train_guide(backbone, guide, [(tokens, labels)], config, tmp_path, resume=True, save_final=False)
    assert result.step == 4 and [s for s, _ in step_dirs(str(tmp_path))] == [3, 4]
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".")]


def test_log_is_truncated_to_the_resumed_step(tmp_path):
    backbone, guide = build(seed=0)
    tokens, labels = random_data(backbone.config, 8)
    config = fast_config(steps=4, save_every=2, keep_last=5, log_every=1)
    train_guide(backbone, guide, [(tokens, labels)], config, tmp_path, save_final=False)
    # as if killed after logging step 4 (and a torn line) but before its checkpoint
    shutil.rmtree(latest_checkpoint(tmp_path))
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    backbone, guide = build(seed=0)
    train_guide(backbone, guide, [(tokens, labels)], config, tmp_path, resume=True, save_final=False)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")]
    assert steps == [1, 2, 3, 4]
    # a fresh (not resumed) run in the same folder starts a fresh log
    backbone, guide = build(seed=0)
    train_guide(backbone, guide, [(tokens, labels)], fast_config(steps=2, log_every=1), tmp_path, save_final=False)
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1, 2]


# ------------------------------------------------------------------------------ state-dict checks
def test_check_state_dict_names_non_finite_tensors_and_stays_short():
    net = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(10)])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    _io.check_state_dict(net, state, "w.safetensors")
    state["3.weight"][0, 1] = float("nan")
    state["7.bias"][1] = -float("inf")
    with pytest.raises(ValueError, match=r"w.safetensors: corrupt weights: non-finite values \(NaN or inf\) in "
                                         r"3.weight, 7.bias$"):
        _io.check_state_dict(net, state, "w.safetensors")
    wrong = {k: torch.zeros(5, *v.shape) for k, v in net.state_dict().items()}
    with pytest.raises(ValueError) as err:
        _io.check_state_dict(net, wrong, "w.safetensors")
    assert str(err.value).endswith("(+17 more)") and len(str(err.value)) < 300
    with pytest.raises(KeyError) as err:
        _io.check_state_dict(net, {}, "w.safetensors")
    assert "(+17 more)" in str(err.value) and len(str(err.value)) < 200
