"""AOT compile of every Triton kernel (sgkernels/kernels/sampling.py, cross_entropy.py) for sm_80 and sm_90, no GPU needed.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas bundled in the triton wheel) for
representative constexpr configs: fp32/bf16/fp16 logits, guide or not, greedy / T == 1 / T != 1,
row mask or not, packed small rows, the register-heaviest single tile, the multi-tile loop; the
remask kernel (plain and fused, small and largest single-tile N, the multi-tile loop, the
decoded-confidence / strict-below / mask-id options); the Philox test helper; the cross-entropy
kernel (fp32/bf16/fp16, int32/int64 targets, mean or not, smoothing or not, packed rows, the largest
single tile, the two-pass multi-tile loop).

The compile runs in a subprocess with TRITON_INTERPRET unset: under the interpreter (set by
conftest.py on machines without a GPU) ``triton.jit`` gives InterpretedFunctions, not JITFunctions.
``python tests/test_triton_aot.py [name filter ...]`` runs the compile directly.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
KERNELS = {  # every kernel of each module of sgkernels/kernels
    "sampling": ("_sample_rows_kernel", "_remask_kernel", "_philox_words_kernel"),
    "cross_entropy": ("_xent_rows_kernel",),
    "head_sample": ("_head_stats_kernel", "_head_pick_kernel"),
    "linear_cross_entropy": ("_lce_mm_kernel", "_lce_rows_kernel"),
    "block_refine": ("_block_commit_kernel", "_entropy_accept_kernel"),
}
N_XENT_CONFIGS = 6
N_HEAD_CONFIGS = 6
N_LCE_CONFIGS = 7
N_REMASK_CONFIGS = 7
N_SAMPLER_CONFIGS = 19
N_BLOCK_CONFIGS = 4


def _load():
    """(triton, ASTSource, GPUTarget, sampling module), imported with real JITFunctions (and the
    other kernel modules importable the same way: :func:`_load_module`)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run with TRITON_INTERPRET unset")
    sys.path.insert(0, ROOT)
    import torch  # noqa: F401  (before sgkernels._C: it links libc10)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sgkernels.kernels import sampling

    return triton, ASTSource, GPUTarget, sampling


def _load_module(name: str):
    import importlib

    return importlib.import_module(f"sgkernels.kernels.{name}")


def _source(triton, ASTSource, fn, types: dict, constexprs: dict):
    """ASTSource for ``fn``: ``types`` maps runtime args to their Triton type string."""
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise TypeError(f"{fn!r} is not a JITFunction (is TRITON_INTERPRET set?)")
    signature = {}
    for name in fn.arg_names:
        signature[name] = "constexpr" if name in constexprs else types[name]
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:  # triton >= 3.3 (3.6, 3.8)
        return ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs))
    return ASTSource(fn=fn, signature=signature, constants=dict(constexprs))  # older spelling


def _sampler_configs(S):
    base = {
        "tokens_ptr": "*i64", "logp_ptr": "*fp32", "status_ptr": "*i32", "rowmask_ptr": "*i1",
        "n_rows": "i32", "V": "i32", "stride_lr": "i64", "stride_lv": "i32", "stride_guide_r": "i64",
        "stride_guide_v": "i32", "one_plus_s": "fp32", "inv_temperature": "fp32", "seed": "i64", "offset": "i64",
        "seed_ptr": "*i64", "offset_ptr": "*i64", "conf_ptr": "*fp32", "top_k": "i32", "top_p": "fp32", "min_p": "fp32",
        "ids_ptr": "*i64",
    }
    # (dtype, guide, mode, rowmask, BLOCK_R, BLOCK_V, NUM_TILES): every constexpr value at least once,
    # the register-heaviest single tile (8192) and the multi-tile path (LLaDA: V = 126464 -> 62 tiles of 2048).
    picks = [
        ("fp32", False, "temp", False, 1, 8192, 1),
        ("bf16", True, "t1", True, 2, 1024, 1),
        ("bf16", True, "greedy", False, 2, 1024, 1),
        ("fp16", False, "temp", True, 256, 8, 1),
        ("fp32", True, "temp", False, 1, 2048, 64),
        ("bf16", False, "t1", True, 1, 2048, 64),
        ("bf16", True, "greedy", False, 1, 2048, 64),
        ("fp32", False, "greedy", True, 1, 2048, 4),
    ]
    # filters / confidence (0 logp, 1 prob, 2 margin, 3 entropy) / seed and offset from memory
    picks = [p + (False, 0, False, False) for p in picks]
    picks += [p + (False,) for p in [  # (the last flag: HF_ORDER, filter_order "hf")
        ("fp32", False, "temp", False, 1, 8192, 1, True, 3, True),
        ("bf16", True, "t1", True, 2, 1024, 1, True, 2, True),
        ("bf16", True, "greedy", True, 2, 1024, 1, True, 1, False),
        ("fp16", False, "temp", True, 256, 8, 1, False, 2, True),
        ("fp32", True, "temp", True, 1, 2048, 64, True, 3, True),
        ("bf16", False, "t1", True, 1, 2048, 64, True, 1, True),
        ("bf16", True, "greedy", True, 1, 2048, 64, True, 2, False),
    ]]
    # filter_order "hf" (block_refine_step: confidence "prob", seed from memory), one tile and the tile loop
    picks += [("bf16", False, "temp", False, 16, 128, 1, True, 1, True, True),
              ("fp32", False, "temp", False, 1, 2048, 128, True, 1, True, True)]
    # the exact negative entropy (confidence code 4, entropy_bound_step), one tile and the tile loop
    picks += [("bf16", False, "t1", False, 16, 128, 1, False, 4, True, False),
              ("fp32", False, "t1", False, 1, 2048, 128, False, 4, True, False)]
    out = []
    for dt, guide, mode, rowmask, block_r, block_v, tiles, filt, conf, rng_ptr, hf in picks:
        types = dict(base, logits_ptr=f"*{dt}", guide_ptr=f"*{dt}")
        const = dict(
            HAS_GUIDE=guide, HAS_ROWMASK=rowmask, GREEDY=mode == "greedy", TEMP_ONE=mode == "t1",
            BLOCK_R=block_r, BLOCK_V=block_v, NUM_TILES=tiles, FILTER=filt, CONF=conf, SEED_PTR=rng_ptr,
            OFFSET_PTR=rng_ptr, HAS_IDS=filt and mode != "greedy",  # row ids: head_sample's row-chunk path
            HF_ORDER=hf,
        )
        name = (f"sample_rows[{dt},guide={guide},{mode},rowmask={rowmask},R={block_r},V={block_v},tiles={tiles},"
                f"filter={filt},conf={conf},rng_ptr={rng_ptr},ids={const['HAS_IDS']},hf={hf}]")
        out.append((name, S._sample_rows_kernel, types, const, max(1, min(16, block_r * block_v // 256))))
    assert len(out) == N_SAMPLER_CONFIGS
    return out


def _remask_configs(S):
    types = {
        "logp_ptr": "*fp32", "mask_ptr": "*i1", "num_ptr": "*i64", "out_mask_ptr": "*i1", "tokens_ptr": "*i64",
        "sampled_ptr": "*i64", "out_tokens_ptr": "*i64", "keys_ptr": "*i64", "status_ptr": "*i32", "N": "i32",
        "tau": "fp32", "dec_conf": "fp32", "mask_id": "i64", "seed": "i64", "offset": "i64",
        "seed_ptr": "*i64", "offset_ptr": "*i64",
    }
    # (FUSED, HAS_DECODED, STRICT, HAS_MASK_ID, MULTI_TILE, BLOCK_N, SEED_PTR/OFFSET_PTR): plain and fused,
    # small and the largest register tile, the multi-tile loop (tiles of _REMASK_TILE), every option at
    # least once (seed / offset from memory on a single tile and on the multi-tile loop).
    picks = [
        (False, False, False, False, False, 256, False),
        (True, False, False, False, False, 4096, True),
        (False, True, True, False, False, 4096, False),
        (True, True, True, True, False, 256, False),
        (False, False, False, False, True, S._REMASK_TILE, False),
        (True, True, True, True, True, S._REMASK_TILE, True),
        (True, False, False, False, True, S._REMASK_TILE, False),
    ]
    out = []
    for fused, dec, strict, mask_id, multi, n, rng_ptr in picks:
        const = dict(FUSED=fused, HAS_DECODED=dec, STRICT=strict, HAS_MASK_ID=mask_id, MULTI_TILE=multi, BLOCK_N=n,
                     SEED_PTR=rng_ptr, OFFSET_PTR=rng_ptr)
        name = (f"remask[fused={fused},decoded={dec},strict={strict},mask_id={mask_id},multi={multi},N={n},"
                f"rng_ptr={rng_ptr}]")
        out.append((name, S._remask_kernel, types, const, max(1, min(8, n // 256))))
    assert len(out) == N_REMASK_CONFIGS
    return out


def _philox_configs(S):
    types = {"rows_ptr": "*i64", "out_ptr": "*i64", "n": "i32", "seed": "i64", "offset": "i64"}
    return [("philox_words", S._philox_words_kernel, types, dict(BLOCK=128), 4)]


def _xent_configs(C):
    base = {
        "nvalid_ptr": "*i64", "loss_ptr": "*fp32", "flags_ptr": "*i32", "n_rows": "i32", "V": "i32",
        "stride_lr": "i64", "stride_lv": "i32", "stride_gr": "i64", "stride_gv": "i32", "ignore_index": "i32",
        "eps": "fp32",
    }
    # (dtype, target dtype, MEAN, SMOOTH, BLOCK_R, BLOCK_V, SINGLE_TILE): every constexpr value at least
    # once, the register-heaviest single tile (8192) and the two-pass loop (tiles of _TILE_V).
    picks = [
        ("fp32", "i64", True, False, 1, 8192, True),
        ("bf16", "i64", True, True, 2, 1024, True),
        ("fp16", "i32", False, True, 256, 8, True),
        ("bf16", "i64", True, True, 1, C._TILE_V, False),
        ("fp32", "i32", False, False, 1, C._TILE_V, False),
        ("fp16", "i64", True, False, 1, C._TILE_V, False),
    ]
    out = []
    for dt, tdt, mean, smooth, block_r, block_v, single in picks:
        types = dict(base, logits_ptr=f"*{dt}", grad_ptr=f"*{dt}", target_ptr=f"*{tdt}")
        const = dict(MEAN=mean, SMOOTH=smooth, BAD_BIT=C.BAD_TARGET, BLOCK_R=block_r, BLOCK_V=block_v, SINGLE_TILE=single)
        name = f"xent_rows[{dt},target={tdt},mean={mean},smooth={smooth},R={block_r},V={block_v},single={single}]"
        out.append((name, C._xent_rows_kernel, types, const, max(1, min(16, block_r * block_v // 256))))
    assert len(out) == N_XENT_CONFIGS
    return out


def _head_configs(H):
    """head_sample: the tl.dot stats kernel (bf16/fp16 tensor cores, fp32 IEEE dot; every BLOCK_R) and
    the per-row pick kernel (LLaDA's V = 126464 -> 988 tiles of 128 -> NUM_TILES 1024)."""
    stats_types = {
        "b_ptr": "*fp32", "tmax_ptr": "*fp32", "usum_ptr": "*fp64", "tsum_ptr": "*fp64", "targ_ptr": "*i32",
        "tbad_ptr": "*i32", "R": "i32", "V": "i32", "D": "i32", "stride_hr": "i64", "stride_wv": "i64",
        "n_tiles": "i32", "inv_temperature": "fp32",
    }
    pick_types = dict(stats_types, ids_ptr="*i64", tokens_ptr="*i64", logp_ptr="*fp32", status_ptr="*i32",
                      seed="i64", offset="i64")
    del pick_types["R"]
    out = []
    for dt, bias, mode, block_r in (("bf16", True, "temp", 64), ("fp16", False, "greedy", 16), ("fp32", True, "t1", 32)):
        f32 = dt == "fp32"
        const = dict(HAS_BIAS=bias, GREEDY=mode == "greedy", TEMP_ONE=mode == "t1", F32_DOT=f32, BLOCK_R=block_r,
                     BLOCK_V=H._TILE_V, BLOCK_K=32 if f32 else 64)
        types = dict(stats_types, h_ptr=f"*{dt}", w_ptr=f"*{dt}")
        out.append((f"head_stats[{dt},bias={bias},{mode},R={block_r}]", H._head_stats_kernel, types, const, 4))
    for dt, ids, mode, tiles in (("bf16", True, "temp", 1024), ("fp32", False, "greedy", 256), ("fp16", True, "t1", 1024)):
        const = dict(HAS_BIAS=True, HAS_IDS=ids, GREEDY=mode == "greedy", TEMP_ONE=mode == "t1", NUM_TILES=tiles,
                     BLOCK_V=H._TILE_V, BLOCK_K=32 if dt == "fp32" else 64)
        types = dict(pick_types, h_ptr=f"*{dt}", w_ptr=f"*{dt}")
        out.append((f"head_pick[{dt},ids={ids},{mode},tiles={tiles}]", H._head_pick_kernel, types, const, 4))
    assert len(out) == N_HEAD_CONFIGS
    return out


def _lce_configs(L):
    """linear_cross_entropy: the tl.dot GEMM (the logits: bf16/fp16 tensor cores with bias; the
    gradient GEMMs: float32 G cast to the weight dtype, accumulate into C; float32 IEEE dot) and the
    rows kernel (plain, label smoothing, conf at T == 1 and T != 1, the gradient with and without the
    entropy term)."""
    mm_types = {"c_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i64", "stride_ak": "i64",
                "stride_bk": "i64", "stride_bn": "i64", "stride_cm": "i64", "stride_cn": "i64"}
    out = []
    for a_dt, b_dt, bias, acc in (("bf16", "bf16", True, False), ("fp16", "fp16", False, False),
                                  ("fp32", "bf16", False, True), ("fp32", "fp32", True, True)):
        types = dict(mm_types, a_ptr=f"*{a_dt}", b_ptr=f"*{b_dt}", bias_ptr=f"*{b_dt}")
        const = dict(HAS_BIAS=bias, ACC=acc, IEEE=b_dt == "fp32", BLOCK_M=64, BLOCK_N=128, BLOCK_K=32)
        out.append((f"lce_mm[{a_dt}x{b_dt},bias={bias},acc={acc}]", L._lce_mm_kernel, types, const, 4))
    rows_types = {"z_ptr": "*fp32", "y_ptr": "*i64", "a_ptr": "*fp32", "c_ptr": "*fp32", "cw_ptr": "*fp32",
                  "stats_ptr": "*fp32", "V": "i32", "stride_z": "i64", "cw_sum": "fp32", "eps": "fp32", "inv_t": "fp32"}
    for conf, temp_one, smooth, grad, has_c in ((False, True, False, True, False), (True, False, True, True, True),
                                                (True, True, False, False, False)):
        const = dict(CONF=conf, TEMP_ONE=temp_one, SMOOTH=smooth, GRAD=grad, HAS_C=has_c, BLOCK_V=L._TILE_V)
        out.append((f"lce_rows[conf={conf},t1={temp_one},ls={smooth},grad={grad},c={has_c}]", L._lce_rows_kernel,
                    rows_types, const, 8))
    assert len(out) == N_LCE_CONFIGS
    return out


def _block_configs(B):
    """block_refine: the commit kernel in the mask mode (prompt, editing, exp of the greedy logp) and
    the uniform mode, one tile and the tile loop's width."""
    types = {
        "tokens_ptr": "*i64", "conf_ptr": "*fp32", "sample_ptr": "*i64", "committed_ptr": "*i8", "prompt_ptr": "*i8",
        "noise_ptr": "*i64", "prev_ptr": "*i64", "transfer_ptr": "*i8", "edit_ptr": "*i8", "probs_ptr": "*fp32",
        "L": "i32", "mask_id": "i64", "quota": "i64", "threshold": "fp32", "edit_threshold": "fp32",
    }
    out = []
    for mask_mode, prompt, edit, exp_conf, block in ((True, True, True, True, 32), (True, False, False, False, 64),
                                                     (False, False, True, False, 64)):
        const = dict(MASK_MODE=mask_mode, HAS_PROMPT=prompt, EDIT=edit, EXP_CONF=exp_conf, BLOCK=block)
        name = f"block_commit[mask={mask_mode},prompt={prompt},edit={edit},exp={exp_conf},BLOCK={block}]"
        out.append((name, B._block_commit_kernel, types, const, max(1, block // 32)))
    types = {"negh_ptr": "*fp32", "tokens_ptr": "*i64", "noise_ptr": "*i64", "entropy_ptr": "*fp32", "prev_ptr": "*i64",
             "accepted_ptr": "*i8", "L": "i32", "bound": "fp32"}
    out.append(("entropy_accept[BLOCK=64]", B._entropy_accept_kernel, types, dict(BLOCK=64), 2))
    assert len(out) == N_BLOCK_CONFIGS
    return out


def main(only=()) -> int:
    triton, ASTSource, GPUTarget, S = _load()
    C = _load_module("cross_entropy")
    configs = _sampler_configs(S) + _remask_configs(S) + _philox_configs(S) + _xent_configs(C)
    configs += (_head_configs(_load_module("head_sample")) + _lce_configs(_load_module("linear_cross_entropy"))
                + _block_configs(_load_module("block_refine")))
    assert {fn.__name__ for _, fn, _, _, _ in configs} == {k for ks in KERNELS.values() for k in ks}
    failed = 0
    for name, fn, types, const, num_warps in configs:
        if only and not any(o in name for o in only):
            continue
        for cc in ARCHS:
            try:
                k = triton.compile(_source(triton, ASTSource, fn, types, const), target=GPUTarget("cuda", cc, 32),
                                   options={"num_warps": num_warps})
                ptx, cubin = k.asm.get("ptx", ""), k.asm.get("cubin", b"")
                if not ptx or not cubin:
                    raise RuntimeError("empty ptx/cubin")
                print(f"OK   sm_{cc} {name}: ptx {len(ptx)} chars, cubin {len(cubin)} bytes, "
                      f"shared {k.metadata.shared} B", flush=True)
            except Exception as exc:  # noqa: BLE001
                failed += 1
                print(f"FAIL sm_{cc} {name}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    return 1 if failed else 0


def trace() -> int:
    """make_fx over fake CUDA tensors (no GPU needed): the launchers trace to
    ``triton_kernel_wrapper_mutation`` nodes through ``torch.library.wrap_triton``."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    _, _, _, S = _load()
    C = _load_module("cross_entropy")

    def step(tokens, is_masked, logits, guide, n, status):
        t, lp = S.guided_sample_triton(logits, guide, 1.0, 0.7, 3, 1, status, 0, 1.0, 0.0, "logp", None, None)[:2]
        m = S.remask_triton(lp, is_masked, n, 1.0, 3, 1, status)
        xent = C.cross_entropy_fwd_triton(logits, tokens, -100, 0.1, "mean")
        return t, m, S.self_guided_step_triton(tokens, is_masked, logits, guide, n, 1.0, 0.0, 2.0, 3, 1, status), xent

    with FakeTensorMode():
        dev = "cuda"
        args = (
            torch.empty(4, 8, dtype=torch.int64, device=dev),
            torch.empty(4, 8, dtype=torch.bool, device=dev),
            torch.empty(4, 8, 1000, dtype=torch.bfloat16, device=dev),
            torch.empty(4, 8, 1000, dtype=torch.bfloat16, device=dev),
            torch.empty(4, dtype=torch.int64, device=dev),
            torch.zeros(1, dtype=torch.int32, device=dev),
        )
        code = make_fx(step)(*args).code
    n_launch = code.count("triton_kernel_wrapper_mutation(")
    print(f"TRACED {n_launch} launches")
    return 0 if n_launch == 5 else 1


def _run_self(*argv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a real compile, not a cache hit
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    return proc, proc.stdout + proc.stderr


def test_wrap_triton_traces(tmp_path):
    proc, out = _run_self("--trace", tmp_path=tmp_path)
    assert proc.returncode == 0 and "TRACED 5 launches" in out, out[-6000:]


def test_aot_compile_all_kernels_sm80_sm90(tmp_path):
    proc, out = _run_self(tmp_path=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    ok = [line for line in out.splitlines() if line.startswith("OK ")]
    assert len(ok) == len(ARCHS) * (N_SAMPLER_CONFIGS + N_REMASK_CONFIGS + 1 + N_XENT_CONFIGS + N_HEAD_CONFIGS
                                     + N_LCE_CONFIGS + N_BLOCK_CONFIGS), out[-6000:]
    for cc in ARCHS:
        assert any(f"sm_{cc} sample_rows" in line for line in ok)
        assert any(f"sm_{cc} remask" in line for line in ok)
        assert any(f"sm_{cc} philox_words" in line for line in ok)
        assert any(f"sm_{cc} xent_rows" in line for line in ok)
        assert any(f"sm_{cc} head_stats" in line for line in ok) and any(f"sm_{cc} head_pick" in line for line in ok)
        assert any(f"sm_{cc} block_commit" in line for line in ok)
        assert any(f"sm_{cc} entropy_accept" in line for line in ok)


def test_every_kernel_is_covered():
    """Every ``@triton.jit`` kernel (``*_kernel``) of every kernel module has an AOT config here."""
    import ast

    folder = os.path.join(ROOT, "sgkernels", "kernels")
    modules = {f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_")}
    assert modules == set(KERNELS)
    for mod, names in KERNELS.items():
        tree = ast.parse(open(os.path.join(folder, f"{mod}.py")).read())
        kernels = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.endswith("_kernel")}
        assert kernels == set(names), mod


if __name__ == "__main__":
    sys.exit(trace() if sys.argv[1:] == ["--trace"] else main(sys.argv[1:]))
