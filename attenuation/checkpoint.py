"""The run checkpoint: what it holds, written atomically, loaded safely (``weights_only=True``: no
arbitrary unpickling) and checked before a resumed run reads it."""
from __future__ import annotations

from pathlib import Path

import torch

from .files import atomic_torch_save

CHECKPOINT_FORMAT = "attenuation.run/1"
CHECKPOINT_KEYS = ("config", "state", "removed", "model_spec", "model", "optimizer", "pruner", "loader",
                   "torch_rng")


def save_checkpoint(contents: dict, path) -> Path:
    """Write ``contents`` (exactly ``CHECKPOINT_KEYS``) with the format tag, atomically."""
    if set(contents) != set(CHECKPOINT_KEYS):
        raise ValueError(f"a checkpoint holds exactly {CHECKPOINT_KEYS}, got {sorted(contents)}")
    return atomic_torch_save({"format": CHECKPOINT_FORMAT, **contents}, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint written by :func:`save_checkpoint`; anything else is a ValueError saying why."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable checkpoint: {error}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a run checkpoint of this version (format {CHECKPOINT_FORMAT!r})")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ValueError(f"{path} lacks the checkpoint entries {', '.join(missing)}: it cannot be resumed")
    return state
