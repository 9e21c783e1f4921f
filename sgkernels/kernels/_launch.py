"""Launch helpers shared by the Triton kernel modules."""
from __future__ import annotations

import torch
import triton
from triton.runtime.jit import JITFunction

# Rows of small vocabularies are packed into one program up to this many elements.
ROW_ELEMS = 2048
ELEMS_PER_THREAD = 8


def launch(kernel):
    """``wrap_triton(kernel)`` for a compiled kernel (torch.compile traces it); the kernel itself
    under TRITON_INTERPRET, where ``triton.jit`` returns an interpreted function instead."""
    if isinstance(kernel, JITFunction):
        return torch.library.wrap_triton(kernel)
    return kernel


def interpreted(kernel) -> bool:
    """Whether ``kernel`` runs in the CPU interpreter (TRITON_INTERPRET was set when it was defined)."""
    return not isinstance(kernel, JITFunction)


def row_tiles(n_rows: int, vocab: int, max_single_tile: int, tile: int):
    """(BLOCK_R, BLOCK_V, NUM_TILES, num_warps) of a kernel over ``n_rows`` rows of ``vocab`` elements.

    ``vocab <= max_single_tile``: whole rows in registers (BLOCK_V = next power of two of vocab,
    NUM_TILES = 1), up to ROW_ELEMS elements of rows packed into one program. Above: one row per
    program in tiles of BLOCK_V = next power of two of ``tile`` (NUM_TILES = the next power of two of
    the tile count). num_warps: ELEMS_PER_THREAD elements per thread, 1 to 16 warps.
    """
    if vocab <= max_single_tile:
        block_v = triton.next_power_of_2(vocab)
        num_tiles = 1
        block_r = max(1, min(ROW_ELEMS // block_v, triton.next_power_of_2(max(n_rows, 1))))
    else:
        block_v = triton.next_power_of_2(tile)
        num_tiles = triton.next_power_of_2(triton.cdiv(vocab, block_v))
        block_r = 1
    num_warps = max(1, min(16, block_r * block_v // (32 * ELEMS_PER_THREAD)))
    return block_r, block_v, num_tiles, num_warps
