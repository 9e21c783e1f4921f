"""MaskTransformer, TOAST and the open-muse state-dict mapping (tiny configs, CPU)."""
import math

import pytest
import torch
import torch.nn.functional as F

import official_folders
from sgkernels.models import (
    TOAST,
    MaskTransformer,
    MaskTransformerConfig,
    TOASTConfig,
    toast_from_open_muse,
    transformer_from_open_muse,
)
from sgkernels.models.toast import toast_param_count
from sgkernels.models.transformer import param_count
from sgkernels.nn.attention import SelfAttention, attention_backend

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")


TINY = dict(codebook_size=16, num_classes=5, grid_size=3, width=32, depth=3, heads=4, mlp_dim=48)
NF = 4  # TOAST factors in the tiny tests


def tiny(**kw):
    return MaskTransformerConfig(**{**TINY, **kw})


def random_tokens(cfg, b, masked_frac=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, cfg.codebook_size, (b, cfg.num_tokens), generator=g)
    mask = torch.rand(b, cfg.num_tokens, generator=g) < masked_frac
    return torch.where(mask, cfg.mask_token_id, tok)


# The published open-muse layout (MaskGitTransformerTOAST with the MaskGIT configuration:
# use_maskgit_mlp, use_bias, layer_norm_embeddings, no encoder LayerNorm), written out by hand in
# sgkernels.bench.official_folders (the real-size benchmark row uses it too).
def open_muse_shapes(cfg, num_factors=NF, toast=True):
    return official_folders.open_muse_shapes(cfg, num_factors, toast)


def open_muse_state_dict(cfg, num_factors=NF, toast=True, seed=0):
    return official_folders.open_muse_state_dict(cfg, num_factors, toast, seed)


def reference_forward(sd, ids, cfg, value_feedbacks=None):
    """Independent forward pass of the published MaskGIT architecture, plain ops on the state dict."""
    d, H, eps = cfg.width, cfg.heads, 1e-12
    B, T = ids.shape

    def lin(name, x):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(name, x, e=eps):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + e) * sd[name + ".weight"] + sd[name + ".bias"]

    def gelu(x):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    h = sd["embed.word_embeddings.weight"][ids] + sd["embed.position_embeddings.weight"][:T][None]
    h = ln("embed.embeddings_ln", h)
    for l in range(cfg.depth):
        p = f"transformer_layers.{l}."
        heads = lambda x: x.reshape(B, T, H, d // H).permute(0, 2, 1, 3)  # noqa: E731
        q, k = heads(lin(p + "attention.query", h)), heads(lin(p + "attention.key", h))
        v = lin(p + "attention.value", h)
        if value_feedbacks is not None:
            v = v + lin(p + "attention.value", value_feedbacks[l])
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // H), dim=-1)
        o = (att @ heads(v)).permute(0, 2, 1, 3).reshape(B, T, d)
        h = ln(p + "attn_layer_norm", h + lin(p + "attention.out", o))
        m = lin(p + "ffn.layer_output", gelu(lin(p + "ffn.intermediate_output", h)))
        h = ln(p + "ffn.layer_norm", h + m)
    x = ln("mlm_layer.mlm_ln", gelu(lin("mlm_layer.mlm_dense", h)))
    logits = lin("mlm_layer.to_logits", x)
    return logits[:, 1:, : cfg.codebook_size], h


def reference_toast(sd, hidden, class_labels, cfg, num_factors=NF):
    """Independent TOAST pass 2 (paper steps 2-5) from the published layout."""
    d, f = cfg.width, num_factors
    pos = sd["cls_anchor_gen.mlp_p.weight"].reshape(1, 1, d, f)
    cls = sd["cls_anchor_gen.mlp_c.weight"][class_labels].reshape(-1, 1, d, f)
    w = sd["cls_anchor_gen.mlp_f.weight"].reshape(1, 1, 1, f)
    e = (w * (pos + cls)).sum(-1)
    e = F.layer_norm(e, (d,), sd["cls_anchor_gen.layer_norm.weight"], sd["cls_anchor_gen.layer_norm.bias"], 1e-5)
    anchor = e @ sd["cls_anchor_gen.mlp_t.weight"].T + sd["cls_anchor_gen.mlp_t.bias"]
    cos = (hidden / hidden.norm(dim=-1, keepdim=True)) @ (anchor / anchor.norm(dim=-1, keepdim=True)).transpose(1, 2)
    x = (hidden * cos.clamp(0, 1)) @ sd["top_down_transform"]
    td = [None] * cfg.depth
    for l in reversed(range(cfg.depth)):
        x = x @ sd[f"decoders.{l}.linear.weight"].T
        td[l] = x @ sd[f"decoders.{l}.linear2.weight"].T
    blank = torch.full((hidden.shape[0], cfg.seq_len), cfg.mask_token_id)
    return reference_forward(sd, blank, cfg, value_feedbacks=td)[0]


# ---------------------------------------------------------------------------------------------
def test_maskgit_256_config():
    cfg = MaskTransformerConfig.maskgit_256()
    assert (cfg.depth, cfg.width, cfg.heads, cfg.mlp_dim, cfg.grid_size) == (24, 768, 16, 3072, 16)
    assert (cfg.codebook_size, cfg.num_classes, cfg.vocab_size, cfg.mask_token_id) == (1024, 1000, 2025, 2024)
    assert (cfg.num_tokens, cfg.seq_len, cfg.norm, cfg.layer_norm_eps) == (256, 257, "post", 1e-12)
    assert MaskTransformerConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kw, match",
    [(dict(width=30), "divisible"), (dict(norm="mid"), "norm"), (dict(depth=0), "depth"),
     (dict(grid_size=(2, 3, 4)), "grid_size"), (dict(dropout=1.5), "dropout"), (dict(gelu="relu"), "gelu")],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_param_counts_maskgit_256_meta():
    cfg = MaskTransformerConfig.maskgit_256()
    with torch.device("meta"):
        model, guide = MaskTransformer(cfg), TOAST(cfg)
    n_model, n_guide = model.num_parameters(), guide.num_parameters()
    assert n_model == param_count(cfg)
    assert n_guide == toast_param_count(guide.config)
    assert 173e6 < n_model < 175e6  # "174M"
    assert 41e6 < n_guide < 43e6  # "42M"
    assert 0.20 <= n_guide / n_model <= 0.25


def test_forward_shapes_and_hidden():
    cfg = tiny()
    model = MaskTransformer(cfg).eval()
    tok = random_tokens(cfg, 2)
    labels = torch.tensor([0, 4])
    logits = model(tok, labels)
    assert logits.shape == (2, cfg.num_tokens, cfg.codebook_size)
    out = model(tok, labels, return_hidden=True, return_layers=True)
    assert torch.equal(out.logits, logits)
    assert out.hidden_states.shape == (2, cfg.seq_len, cfg.width)
    assert len(out.layer_inputs) == len(out.layer_outputs) == cfg.depth
    assert torch.equal(out.layer_outputs[-1], out.hidden_states)
    assert torch.equal(out.layer_inputs[1], out.layer_outputs[0])
    # logits come from the image positions only, sliced to the codebook
    assert torch.allclose(model.logits_from_hidden(out.hidden_states), logits)
    # class label -1 = [MASK] in the class slot
    ids = model.input_ids(tok, torch.tensor([-1, 2]))
    assert ids[0, 0] == cfg.mask_token_id and ids[1, 0] == cfg.codebook_size + 2
    assert torch.equal(model.input_ids(tok)[:, 0], torch.full((2,), cfg.mask_token_id))


def test_pre_ln_option():
    cfg = tiny(norm="pre")
    model = MaskTransformer(cfg).eval()
    assert model.final_norm is not None and model.num_parameters() == param_count(cfg)
    out = model(random_tokens(cfg, 2), torch.tensor([1, 2]), return_hidden=True)
    assert torch.isfinite(out.logits).all()


def test_dropout_only_in_training():
    cfg = tiny()
    model = MaskTransformer(cfg)
    tok, labels = random_tokens(cfg, 2), torch.tensor([0, 1])
    model.eval()
    assert torch.equal(model(tok, labels), model(tok, labels))
    model.train()
    assert not torch.equal(model(tok, labels), model(tok, labels))


def test_forward_bad_input():
    cfg = tiny()
    model = MaskTransformer(cfg)
    with pytest.raises(ValueError, match=r"grid 3x3"):
        model(torch.zeros(1, 16, dtype=torch.int64), torch.tensor([0]))
    with pytest.raises(ValueError, match="class_labels"):
        model(random_tokens(cfg, 1), torch.tensor([5]))
    with pytest.raises(ValueError, match="class_labels"):
        model(random_tokens(cfg, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.full((1, 9), cfg.codebook_size + 1), torch.tensor([0]))
    with pytest.raises(TypeError, match="tokens"):
        model(torch.zeros(1, 9), torch.tensor([0]))
    with pytest.raises(ValueError, match="value_feedbacks"):
        model(random_tokens(cfg, 1), torch.tensor([0]), value_feedbacks=[None])


def test_attention_value_feedback():
    torch.manual_seed(0)
    att = SelfAttention(16, 2).eval()
    h, f = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    assert attention_backend("cpu") == "sdpa"
    # reference: v = W_v h + W_v f (bias twice), plain softmax attention
    q = att.query(h).view(2, 5, 2, 8).transpose(1, 2)
    k = att.key(h).view(2, 5, 2, 8).transpose(1, 2)
    v = (att.value(h) + att.value(f)).view(2, 5, 2, 8).transpose(1, 2)
    o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    ref = att.out(o.transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(att(h, f), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(att(h, f), att(h))


# --------------------------------------------------------------------------------------------- TOAST
def test_toast_backbone_frozen_and_trainable_params():
    cfg = tiny()
    model, guide = MaskTransformer(cfg), TOAST(cfg, num_factors=NF)
    model.train(), guide.train()
    tok, labels = random_tokens(cfg, 2), torch.tensor([1, 3])
    hidden = model(tok, labels, return_hidden=True).hidden_states
    out = guide(model, hidden, labels, return_layers=True)
    loss = F.cross_entropy(out.logits.reshape(-1, cfg.codebook_size), torch.randint(0, 16, (2 * 9,)))
    (loss + guide.reconstruction_loss(out)).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags are untouched
    names = {n for n, p in guide.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert names == {n for n, _ in guide.named_parameters()}
    assert set(dict(guide.named_parameters())) == {
        "anchor.position", "anchor.classes", "anchor.factor_weights", "anchor.norm.weight", "anchor.norm.bias",
        "anchor.proj.weight", "anchor.proj.bias", "selection",
        *(f"top_down.{l}.weight" for l in range(cfg.depth)), *(f"feedback.{l}.weight" for l in range(cfg.depth)),
    }
    torch.testing.assert_close(guide.selection.detach(), torch.eye(cfg.width))


def test_toast_reconstruction_loss():
    cfg = tiny()
    model, guide = MaskTransformer(cfg).eval(), TOAST(cfg)
    labels = torch.tensor([0, 1])
    hidden = model(random_tokens(cfg, 2), labels, return_hidden=True).hidden_states
    out = guide(model, hidden, labels, return_layers=True)
    expect = 0.1 * sum(F.mse_loss(guide.top_down[l](out.layer_outputs[l]), out.layer_inputs[l]) for l in range(cfg.depth))
    torch.testing.assert_close(guide.reconstruction_loss(out), expect)
    with pytest.raises(ValueError, match="return_layers"):
        guide.reconstruction_loss(model(random_tokens(cfg, 1), return_hidden=True))


def test_toast_zero_feedback_is_plain_blank_pass():
    cfg = tiny()
    model, guide = MaskTransformer(cfg).eval(), TOAST(cfg)
    with torch.no_grad():
        for m in guide.feedback:
            m.weight.zero_()
    labels = torch.tensor([2, 4])
    hidden = model(random_tokens(cfg, 2), labels, return_hidden=True).hidden_states
    blank = torch.full((2, cfg.num_tokens), cfg.mask_token_id)
    with torch.no_grad():
        smooth = guide(model, hidden, labels)
        # f_l = 0 still adds W_v's bias once more (v = W_v h + W_v f, as the official code) ...
        doubled = MaskTransformer(cfg).eval()
        doubled.load_state_dict(model.state_dict())
        for blk in doubled.blocks:
            blk.attention.value.bias.mul_(2)
        torch.testing.assert_close(smooth, doubled(blank, None), rtol=1e-4, atol=1e-4)
        # ... so with zero value biases, zero feedback is exactly the plain pass on the blank canvas
        for blk in model.blocks:
            blk.attention.value.bias.zero_()
        torch.testing.assert_close(guide(model, hidden, labels), model(blank, None), rtol=1e-4, atol=1e-4)
        assert torch.allclose(model(blank, None), model(blank, None, value_feedbacks=[None] * cfg.depth))


def test_toast_other_backbone_errors():
    cfg = tiny()
    guide = TOAST(cfg)
    for kw, name in ((dict(width=64), "width"), (dict(depth=2), "depth"), (dict(num_classes=7), "num_classes")):
        other = MaskTransformer(tiny(**kw))
        with pytest.raises(ValueError, match=f"another backbone.*{name}"):
            guide(other, torch.zeros(1, other.config.seq_len, other.config.width), torch.tensor([0]))
    model = MaskTransformer(cfg)
    with pytest.raises(ValueError, match="hidden_states"):
        guide(model, torch.zeros(1, cfg.seq_len + 1, cfg.width), torch.tensor([0]))
    with pytest.raises(ValueError, match="class_labels"):
        guide(model, torch.zeros(1, cfg.seq_len, cfg.width), torch.tensor([5]))
    assert TOASTConfig.from_dict(guide.config.to_dict()) == guide.config


# --------------------------------------------------------------------------------------------- open-muse
def test_from_open_muse_matches_reference_forward():
    cfg = tiny(dropout=0.0, attention_dropout=0.0)
    sd = open_muse_state_dict(cfg)
    model = transformer_from_open_muse(sd, cfg).eval()
    guide = toast_from_open_muse(sd, cfg).eval()
    assert guide.config.num_factors == NF
    tok, labels = random_tokens(cfg, 3, seed=1), torch.tensor([0, 2, 4])
    ids = torch.cat([(labels + cfg.codebook_size)[:, None], tok], 1)
    ref_logits, ref_hidden = reference_forward(sd, ids, cfg)
    with torch.no_grad():
        out = model(tok, labels, return_hidden=True)
        torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.hidden_states, ref_hidden, rtol=1e-4, atol=1e-4)
        smooth = guide(model, out.hidden_states, labels)
    ref_smooth = reference_toast(sd, ref_hidden, labels, cfg)
    torch.testing.assert_close(smooth, ref_smooth, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(smooth, ref_logits, atol=1e-2)


def test_from_open_muse_plain_backbone_without_toast_keys():
    cfg = tiny()
    sd = open_muse_state_dict(cfg, toast=False)
    transformer_from_open_muse(sd, cfg)
    with pytest.raises(KeyError, match="missing keys.*cls_anchor_gen"):
        toast_from_open_muse(sd, cfg)


def test_from_open_muse_key_errors_name_the_keys():
    cfg = tiny()
    sd = open_muse_state_dict(cfg)
    missing = dict(sd)
    del missing["transformer_layers.1.attention.value.bias"]
    with pytest.raises(KeyError, match=r"missing keys \['transformer_layers.1.attention.value.bias'\]"):
        transformer_from_open_muse(missing, cfg)
    extra = dict(sd, **{"transformer_layers.1.crossattention.query.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match=r"unknown keys \['transformer_layers.1.crossattention.query.weight'\]"):
        transformer_from_open_muse(extra, cfg)
    transformer_from_open_muse(extra, cfg, strict=False)
    with pytest.raises(KeyError, match=r"missing keys \['decoders.2.linear2.weight'\]"):
        toast_from_open_muse({k: v for k, v in sd.items() if k != "decoders.2.linear2.weight"}, cfg)
    # a deeper checkpoint: its extra layers are named
    deep = open_muse_state_dict(tiny(depth=4))
    with pytest.raises(KeyError, match=r"transformer_layers.3.attention.key.weight"):
        transformer_from_open_muse(deep, cfg)
    with pytest.raises(ValueError, match="norm"):
        transformer_from_open_muse(sd, tiny(norm="pre"))


def test_from_open_muse_grid_size_mismatch():
    sd = open_muse_state_dict(tiny(grid_size=4))
    with pytest.raises(ValueError, match=r"embed.position_embeddings.weight: expected \(10, 32\).*got \(17, 32\)"):
        transformer_from_open_muse(sd, tiny(grid_size=3))
    with pytest.raises(ValueError, match="cls_anchor_gen.mlp_p.weight") as err:
        toast_from_open_muse(open_muse_state_dict(tiny(width=16, heads=2)), tiny())
    # 13 mismatches: the first 3 are named, the rest counted (the message stays one short line)
    assert str(err.value).endswith("(+10 more)") and len(str(err.value)) < 400


# --------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_roundtrip(tmp_path):
    from sgkernels.models.checkpoint import load_checkpoint, read_config, save_checkpoint

    cfg = tiny(grid_size=(3, 2), norm="pre")
    model, guide = MaskTransformer(cfg).eval(), TOAST(cfg, num_factors=NF).eval()
    save_checkpoint(tmp_path / "ck", model, guide, format="torch")
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["config.json", "guide.pt", "model.pt"]  # no temp files left behind
    assert read_config(tmp_path / "ck")["weights"] == "torch"
    model2, guide2 = load_checkpoint(tmp_path / "ck")
    assert model2.config == cfg and guide2.config == guide.config
    tok, labels = random_tokens(cfg, 2), torch.tensor([1, 2])
    with torch.no_grad():
        out, out2 = model(tok, labels, return_hidden=True), model2(tok, labels, return_hidden=True)
        assert torch.equal(out.logits, out2.logits)
        assert torch.equal(guide(model, out.hidden_states, labels), guide2(model2, out2.hidden_states, labels))
    # re-saving without a guide drops the stale guide file
    save_checkpoint(tmp_path / "ck", model, format="torch")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.pt"]
    assert load_checkpoint(tmp_path / "ck")[1] is None


def test_checkpoint_errors_name_keys(tmp_path):
    from sgkernels.models.checkpoint import load_checkpoint, save_checkpoint

    cfg = tiny()
    model, guide = MaskTransformer(cfg), TOAST(cfg, num_factors=NF)
    d = tmp_path / "ck"
    save_checkpoint(d, model, guide, format="torch")
    sd = torch.load(d / "model.pt", weights_only=True)
    del sd["blocks.0.mlp_in.bias"]
    sd["blocks.9.extra"] = torch.zeros(1)
    torch.save(sd, d / "model.pt")
    with pytest.raises(KeyError, match=r"missing keys \['blocks.0.mlp_in.bias'\]; unexpected keys \['blocks.9.extra'\]"):
        load_checkpoint(d)
    # weights of another grid size than the config says
    save_checkpoint(d, MaskTransformer(tiny(grid_size=4)), format="torch")
    small = torch.load(d / "model.pt", weights_only=True)
    save_checkpoint(d, model, format="torch")
    torch.save(small, d / "model.pt")
    with pytest.raises(ValueError, match=r"position_embeddings.weight: expected \(10, 32\), got \(17, 32\)"):
        load_checkpoint(d)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path / "nothing")
    with pytest.raises(ValueError, match="another backbone"):
        save_checkpoint(d, MaskTransformer(tiny(depth=2)), guide, format="torch")
    with pytest.raises(ValueError, match="format"):
        save_checkpoint(d, model, format="npz")


def test_checkpoint_safetensors(tmp_path):
    from sgkernels._io import safetensors_available
    from sgkernels.models.checkpoint import load_checkpoint, save_checkpoint

    model = MaskTransformer(tiny())
    if not safetensors_available():
        with pytest.raises(ImportError, match="safetensors"):
            save_checkpoint(tmp_path, model, format="safetensors")
        save_checkpoint(tmp_path, model)  # auto falls back to torch.save
        assert (tmp_path / "model.pt").exists()
        return
    save_checkpoint(tmp_path, model, TOAST(model.config, num_factors=NF))
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "guide.safetensors").exists()
    model2, _ = load_checkpoint(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
