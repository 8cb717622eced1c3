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

Background saves (``save_async`` → ``PendingSave.finish``): the state is copied to host
memory in a background thread (``make_stager``: DCP's ``DefaultStager`` with async staging,
into pinned buffers on CUDA that the stager keeps for the next save), so ``save_async``
returns at once. Until ``PendingSave.wait_staged`` returns, the parameters and optimizer
state must not change: the learner waits for it before its next ``optimizer.step``, so
the step after a save still overlaps its forward and backward with the copy. (Staging
inside ``save_async`` into fresh pageable memory, DCP's default, stalled the step after
each save of a Qwen3-0.6B learner, 7 GB of fp32 state, by 5-9 s on an H200.) The write
and DCP's own collectives run in a thread over ``group``, a gloo group used for nothing
else (never interleaved with training's collectives). Rank 0's
write finishes only after DCP gathered every rank's write results and wrote the metadata,
so rank 0 writes ``COMPLETE`` when its own future is done, with no barrier. At most one
save is in flight: every rank finishes the previous one before starting the next, so the
gloo group's collectives come in the same order everywhere. A failed write raises from
``finish``; a crash before it leaves a directory without ``COMPLETE`` (never loaded).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._state_dict_stager import StateDictStager
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
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


def _prepare(path: Path) -> None:
    """Clear a partial directory of this step (rank 0), then every rank goes on together."""
    if dist.get_rank() == 0 and path.exists():
        shutil.rmtree(path)
    dist.barrier()


def _complete(root: Path, path: Path, step: int, trainer_state: dict, keep: int) -> None:
    """Rank 0, once every shard and the metadata are written: trainer state, marker, prune."""
    if dist.get_rank() == 0:
        _write_durably(path / TRAINER_FILE, json.dumps(trainer_state))
        _write_durably(path / MARKER, f"step {step}\n")
        _prune(Path(root), path, keep)


def save(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         trainer_state: dict, keep: int) -> Path:
    path = step_dir(root, step)
    if (path / MARKER).exists():
        return path
    _prepare(path)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    dist.barrier()
    _complete(root, path, step, trainer_state, keep)
    dist.barrier()
    return path


@dataclass
class PendingSave:
    """A checkpoint being written in the background (``save_async``)."""

    root: Path
    path: Path
    step: int
    trainer_state: dict
    """Taken when the save started: it describes the state being written."""
    keep: int
    future: Future | None
    """DCP's write; None when the step already had a complete checkpoint."""
    staged: Future | None = None
    """The copy of the state into host memory; None when done or not asynchronous."""

    def wait_staged(self) -> None:
        """Return once the state is copied out (raising the copy's error): from then on
        training may change the parameters and optimizer state."""
        if self.staged is not None:
            self.staged.result()
            self.staged = None

    def done(self) -> bool:
        """Whether this rank's write has finished (``finish`` would not block)."""
        return self.future is None or self.future.done()

    def finish(self) -> Path:
        """Every rank: wait for this rank's write (raising its error); rank 0 then marks the
        checkpoint complete. No collective: ranks may finish at different times."""
        if self.future is not None:
            self.wait_staged()
            self.future.result()
            _complete(self.root, self.path, self.step, self.trainer_state, self.keep)
            self.future = None
        return self.path


class KeptStateDictStager(StateDictStager):
    """DCP's state-dict copier, whose ``close`` does nothing: it lives as long as the learner
    (its pinned buffers and dispatch table go with the process). torch 2.11's
    ``DefaultStager`` closes its copier after every stage, which empties the copier's
    dispatch table and drops its pinned buffers: the next save then re-pins everything, and
    fails outright on a class object in the state (``KeyError: <class 'type'>``: the table's
    ``type`` entry is gone; the learner's second background save on an H200 died so,
    2026-12-02). Later torch versions no longer close it there, and this changes nothing
    for them."""

    def close(self) -> None:
        pass


def make_stager(device: torch.device) -> DefaultStager:
    """The stager of one learner's background saves, kept for its life: on CUDA it copies
    into pinned host buffers (allocated at the first save, reused by the next: as large as
    the rank's model and optimizer shards) on a stream of its own; on CPU into plain memory.
    Either way in a thread of its own. Its copier is a ``KeptStateDictStager``."""
    cuda = device.type == "cuda"
    with torch.cuda.device(device) if cuda else contextlib.nullcontext():  # its stream: on our device
        stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                              use_async_staging=True, use_non_blocking_copy=cuda))
    copier = stager._state_dict_stager  # DefaultStager's only copier; no public way to pass one
    stager._state_dict_stager = KeptStateDictStager(pin_memory=copier.pin_memory, share_memory=copier.share_memory)
    return stager


def save_async(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               trainer_state: dict, keep: int, group: dist.ProcessGroup, stager: DefaultStager) -> PendingSave:
    """Collective: start copying the state to host memory (``stager``, from ``make_stager``)
    and writing it, both in the background."""
    path = step_dir(root, step)
    if (path / MARKER).exists():
        return PendingSave(Path(root), path, step, trainer_state, keep, None)
    _prepare(path)
    msd, osd = get_state_dict(model, optimizer)
    device = next(model.parameters()).device
    if device.type == "cuda":
        # The stager's stream does not wait for ours: the step's last kernels (the
        # optimizer's) must have run before it reads the parameters.
        torch.cuda.current_stream(device).synchronize()
    got = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(path), process_group=group,
                         async_stager=stager)  # an async stager: DCP answers with both futures
    return PendingSave(Path(root), path, step, trainer_state, keep, got.upload_completion, got.staging_completion)


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
