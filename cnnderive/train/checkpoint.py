"""RUN_DIR/checkpoint.npz: parameters, optimiser state and what the run was.

One ``.npz`` file (uncompressed, so arrays come back bit for bit) holding
``param/<name>`` for each network parameter, ``optim/<key>`` for each optimiser buffer
and ``meta``, a JSON string: the network name, epoch, seed, data set and its source,
the recipe, the optimiser's kind, hyperparameters and step count, and the metrics
history up to that epoch. Files are written atomically: to a temporary name in the
same folder, then renamed over the old checkpoint with ``os.replace``, so a crash
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnderive_common.files import replace_atomically

__all__ = ["CHECKPOINT_NAME", "Checkpoint", "CheckpointError", "load", "save"]

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not one of ours."""


@dataclass
class Checkpoint:
    params: dict[str, np.ndarray]
    optimizer: dict  # the optimiser's state_dict()
    meta: dict  # net, epoch, seed, dataset, source, recipe, history, ...

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])


def save(path: Path, checkpoint: Checkpoint) -> None:
    arrays: dict[str, np.ndarray] = {}
    for name, value in checkpoint.params.items():
        arrays[f"param/{name}"] = value
    opt = dict(checkpoint.optimizer)
    for key, value in opt.pop("buffers").items():
        arrays[f"optim/{key}"] = value
    meta = dict(checkpoint.meta, format=FORMAT, optimizer_state=opt)
    arrays["meta"] = np.array(json.dumps(meta))
    replace_atomically(path, lambda handle: np.savez(handle, **arrays))


def load(path: Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):  # np.load would take it for a pickle, and say so
        raise CheckpointError(
            f"{path} is not a cnnderive checkpoint: not an .npz archive (damaged, or another "
            "kind of file)"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            params = {k[len("param/") :]: data[k] for k in data.files if k.startswith("param/")}
            buffers = {k[len("optim/") :]: data[k] for k in data.files if k.startswith("optim/")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, json.JSONDecodeError) as error:
        reason = str(error)
        if "pickle" in reason:  # numpy's advice to load it unsafely is not ours to give
            reason = "it holds pickled Python objects, which are never loaded"
        raise CheckpointError(f"{path} is not a readable cnnderive checkpoint ({reason})") from None
    if meta.get("format") != FORMAT or "optimizer_state" not in meta:
        raise CheckpointError(f"{path} is not a cnnderive checkpoint of format {FORMAT}")
    optimizer = dict(meta.pop("optimizer_state"), buffers=buffers)
    return Checkpoint(params=params, optimizer=optimizer, meta=meta)
