"""DCP checkpoints of the learner with an atomic completion marker and keep-last-k.

Layout: ``<dir>/step-000012/`` holds the DCP shards (model + optimizer, every rank writes
its own), ``trainer.json`` (step, version, scheduler state, consumed ids; rank 0) and
``COMPLETE``, written by rank 0 last, after a barrier that follows every rank's write. The
marker is written to a temporary name, fsynced and renamed, so it either exists whole or
not at all.

Invariants and failure behaviour:
- A directory without ``COMPLETE`` is never loaded (a crash mid-save leaves one behind);
  ``latest_complete`` skips it, and the next successful save of a later step removes it.
- A complete checkpoint is never written over: saving a step that already has one (the
  step counter only moves with ``train_step``, so the state is the same) returns it as is.
- A partial directory of the step being saved is cleared first, so no stale shard of a
  crashed attempt mixes with the new one.
- After a save, only the newest ``keep`` complete checkpoints remain.
- Saving and loading are collectives: every rank calls them, in the same order.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

MARKER = "COMPLETE"
TRAINER_FILE = "trainer.json"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def latest_complete(root: Path) -> Path | None:
    root = Path(root)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / MARKER).exists())
    return done[-1] if done else None


def save(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         trainer_state: dict, keep: int) -> Path:
    path = step_dir(root, step)
    if (path / MARKER).exists():
        return path
    if dist.get_rank() == 0 and path.exists():
        shutil.rmtree(path)
    dist.barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    dist.barrier()
    if dist.get_rank() == 0:
        _write_durably(path / TRAINER_FILE, json.dumps(trainer_state))
        _write_durably(path / MARKER, f"step {step}\n")
        _prune(Path(root), path, keep)
    dist.barrier()
    return path


def _write_durably(target: Path, text: str) -> None:
    """Write-to-temporary, fsync, rename: ``target`` appears complete or not at all."""
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _prune(root: Path, newest: Path, keep: int) -> None:
    complete = sorted(p for p in root.glob("step-*") if (p / MARKER).exists())
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for p in root.glob("step-*"):  # partial saves older than the one just completed
        if not (p / MARKER).exists() and p.name < newest.name:
            shutil.rmtree(p, ignore_errors=True)


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model and optimizer shards in place; returns the trainer state."""
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((Path(path) / TRAINER_FILE).read_text())
