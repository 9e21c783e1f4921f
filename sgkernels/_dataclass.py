"""Dataclass configs to and from JSON-ready dicts (shared by model, guide and training configs)."""
from __future__ import annotations

import dataclasses


def from_dict(cls, d: dict):
    """``cls(**d)`` for a dataclass ``cls``; ValueError naming any field ``cls`` does not have."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
    return cls(**d)
