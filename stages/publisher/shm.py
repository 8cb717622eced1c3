"""Double-buffered shared-memory weight slots (the ``shm`` transport's data plane, CPU).

The writer (learner rank 0) puts version v into slot ``v % 2``; readers (engines, logprob)
load straight out of it. Each slot is a file in ``/dev/shm`` (tmpfs: RAM, no disk), mapped
with ``mmap``, laid out as::

    [0:8)    seq      u64  even: stable; odd: a write is in progress (seqlock)
    [8:16)   version  u64  weight version held
    [16:24)  nbytes   u64  payload bytes
    [64:...)           payload (buckets back to back, as the manifest describes)

Invariants and failure behaviour:
- A reader is never torn. While it reads it holds a shared ``flock`` on the slot file; a
  writer takes the exclusive lock without waiting, and when a reader holds the slot it
  writes a fresh file instead (new name, new inode) and unlinks the old name: the reader
  keeps its consistent view. The seqlock is the second guard: a reader refuses a slot whose
  ``seq`` is odd (a writer died mid-write) or changed, or that holds another version
  (``TornRead``: load the newer version instead).
- Slot files are named per writer instance (``conveyor-<run>-w<slot>-<instance>g<n>``):
  a restarted writer never truncates or rewrites a file that a reader may have mapped. Once
  it completed its first version it removes the older instances' files (readers that
  still map them keep their pages until they let go).
- Readers keep at most ``READER_MAPS`` mappings (least recently used dropped, never a held
  one), so the pages of replaced slot files are freed.
- ``hold`` keeps the shared lock after the read, for an engine whose parameters *are* the
  slot's payload (zero-copy, ``TorchEngine`` on CPU): the slot is never rewritten while
  held (a writer goes to a fresh file, as above) until ``release``. A process that dies
  lets go of its locks with it.
- Slot files are removed by ``ShmWeightWriter.close()``; ``remove_run_slots`` removes every
  file of a run (the supervisor's end-of-run clean-up).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
HEADER_BYTES = 64
"""Header size; payload starts 64-byte aligned."""
READER_MAPS = 3
"""Mappings a reader keeps open: the two slots, plus one replaced file while in use."""
_HDR = struct.Struct("<QQQ")


class TornRead(Exception):
    """The slot changed while it was read; load the newer version instead."""


def run_slot_id(run_name: str, run_dir: str | Path) -> str:
    """Names a run's slots: stable across restarts, distinct across run directories."""
    import zlib

    return f"{run_name}-{zlib.crc32(str(Path(run_dir).resolve()).encode()):08x}"


def slot_path(run_id: str, slot: int, generation: int | str) -> Path:
    return SHM_DIR / f"conveyor-{run_id}-w{slot}-g{generation}"


class _Slot:
    def __init__(self, path: Path, nbytes: int) -> None:
        self.path, self.nbytes = path, nbytes
        self.file = open(path, "w+b")
        self.file.truncate(HEADER_BYTES + nbytes)
        self.mm = mmap.mmap(self.file.fileno(), HEADER_BYTES + nbytes)

    def close(self, unlink: bool = True) -> None:
        with contextlib.suppress(BufferError):  # a caller still holds a view: the GC unmaps later
            self.mm.close()
        self.file.close()
        if unlink:
            self.path.unlink(missing_ok=True)


class ShmWeightWriter:
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.instance = secrets.token_hex(3)
        self._slots: dict[int, _Slot] = {}
        self._generation = 0
        self._cleaned = False
        self.replaced = 0
        """Writes that found their slot held by a reader and went to a fresh file."""

    def _new_slot(self, slot: int, nbytes: int) -> _Slot:
        old = self._slots.pop(slot, None)
        if old is not None:
            old.close()
        self._generation += 1
        s = _Slot(slot_path(self.run_id, slot, f"{self.instance}g{self._generation}"), nbytes)
        self._slots[slot] = s
        return s

    @contextlib.contextmanager
    def slot(self, version: int, nbytes: int) -> Iterator[np.ndarray]:
        """Exclusive, seqlocked access to the slot of ``version``: yields its payload as a
        writable uint8 array of ``nbytes``; the version is readable once the block exits
        without an exception (one that raises leaves the slot marked as mid-write)."""
        s = self._slots.get(version % 2)
        if s is None or s.nbytes < nbytes:
            s = self._new_slot(version % 2, nbytes)
        try:
            fcntl.flock(s.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a reader is loading the version this slot holds
            self.replaced += 1
            s = self._new_slot(version % 2, nbytes)
            fcntl.flock(s.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            seq = _HDR.unpack_from(s.mm, 0)[0]
            seq += seq % 2  # a crashed write left it odd
            _HDR.pack_into(s.mm, 0, seq + 1, version, nbytes)  # odd: writing
            dst = np.frombuffer(s.mm, np.uint8, nbytes, HEADER_BYTES)
            yield dst
            del dst
            _HDR.pack_into(s.mm, 0, seq + 2, version, nbytes)  # even: stable
        finally:
            fcntl.flock(s.file.fileno(), fcntl.LOCK_UN)
        if not self._cleaned:
            self._cleaned = True
            self._remove_other_instances()

    def path_of(self, version: int) -> str:
        return str(self._slots[version % 2].path)

    def write(self, version: int, buffers: Iterable[memoryview | bytes | np.ndarray], nbytes: int) -> str:
        """Copy ``buffers`` (``nbytes`` in total) into the slot of ``version``; returns its path."""
        with self.slot(version, nbytes) as dst:
            pos = 0
            for b in buffers:
                src = np.frombuffer(b, np.uint8) if not isinstance(b, np.ndarray) else b.reshape(-1).view(np.uint8)
                if pos + src.size > nbytes:
                    raise ValueError(f"more than the {nbytes} bytes the manifest says")
                dst[pos : pos + src.size] = src
                pos += src.size
            if pos != nbytes:
                raise ValueError(f"wrote {pos} bytes, manifest says {nbytes}")
        return self.path_of(version)

    def _remove_other_instances(self) -> None:
        mine = {s.path for s in self._slots.values()}
        for p in SHM_DIR.glob(f"conveyor-{self.run_id}-w*"):
            if p not in mine:
                p.unlink(missing_ok=True)

    def close(self) -> None:
        for s in self._slots.values():
            s.close()
        self._slots.clear()


class ShmWeightReader:
    """Maps slot files on demand and reads a version without tearing."""

    def __init__(self) -> None:
        self._maps: OrderedDict[str, tuple[int, object, mmap.mmap]] = OrderedDict()
        self.held: set[str] = set()
        """Paths share-locked past a read (``hold``)."""

    def _map(self, path: str) -> tuple[object, mmap.mmap]:
        ino = os.stat(path).st_ino  # OSError if the file is gone
        have = self._maps.get(path)
        if have is not None and have[0] == ino:
            self._maps.move_to_end(path)
            return have[1], have[2]
        if have is not None:
            self._drop(path)
        f = open(path, "rb")
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            f.close()
            raise
        self._maps[path] = (os.fstat(f.fileno()).st_ino, f, mm)
        for old in [p for p in self._maps if p not in self.held][: max(0, len(self._maps) - READER_MAPS)]:
            self._drop(old)
        return f, mm

    def _drop(self, path: str) -> None:
        _, f, mm = self._maps.pop(path)
        with contextlib.suppress(BufferError):
            mm.close()
        f.close()

    @contextlib.contextmanager
    def view(self, path: str, version: int) -> Iterator[np.ndarray]:
        """The payload of ``version`` as a read-only uint8 array, valid inside the block (the
        slot is share-locked meanwhile, so no writer touches it). ``TornRead`` if the slot
        holds another version or a write is (or died) in progress."""
        f, mm = self._map(path)
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        try:
            seq0, v, nbytes = _HDR.unpack_from(mm, 0)
            if seq0 % 2 or v != version:
                raise TornRead(f"{path}: holds version {v} (seq {seq0}), wanted {version}")
            if HEADER_BYTES + nbytes > len(mm):
                raise TornRead(f"{path}: header says {nbytes} bytes, file has {len(mm) - HEADER_BYTES}")
            yield np.frombuffer(mm, np.uint8, nbytes, HEADER_BYTES)
            if _HDR.unpack_from(mm, 0)[0] != seq0:  # only a writer ignoring the lock gets here
                raise TornRead(f"{path}: overwritten while reading version {version}")
        finally:
            if path not in self.held:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def hold(self, path: str, version: int) -> np.ndarray:
        """The payload of ``version`` as a read-only uint8 array that stays valid and unchanged
        until ``release(path)`` (the shared lock is kept). ``TornRead`` as ``view``."""
        f, mm = self._map(path)
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        seq0, v, nbytes = _HDR.unpack_from(mm, 0)
        if seq0 % 2 or v != version or HEADER_BYTES + nbytes > len(mm):
            if path not in self.held:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            raise TornRead(f"{path}: holds version {v} (seq {seq0}, {nbytes} bytes), wanted {version}")
        self.held.add(path)
        return np.frombuffer(mm, np.uint8, nbytes, HEADER_BYTES)

    def release(self, path: str) -> None:
        """Let go of a ``hold`` (a writer may rewrite the slot in place again)."""
        if path in self.held:
            self.held.discard(path)
            have = self._maps.get(path)
            if have is not None:
                fcntl.flock(have[1].fileno(), fcntl.LOCK_UN)

    def read(self, path: str, version: int) -> np.ndarray:
        """A private copy of the payload of ``version`` (uint8 array)."""
        with self.view(path, version) as payload:
            return payload.copy()

    def close(self) -> None:
        self.held.clear()
        for path in list(self._maps):
            self._drop(path)


def remove_run_slots(run_id: str) -> None:
    """Delete every slot file of a run (the supervisor calls this at the end)."""
    for p in SHM_DIR.glob(f"conveyor-{run_id}-w*"):
        p.unlink(missing_ok=True)
