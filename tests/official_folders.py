"""Tiny random-weight checkpoint folders in the official open-muse / UnlockMGM layout (for the tests).

The builders live in :mod:`sgkernels.bench.official_folders` (the real-size benchmark row writes the
paper's model with them); this module re-exports them under the names the tests use.
"""
from sgkernels.bench.official_folders import (  # noqa: F401
    EMA_STATE,
    open_muse_shapes,
    open_muse_state_dict,
    transformer_config,
    vqgan_config,
    vqgan_shapes,
    vqgan_state_dict,
    write_folder,
)
