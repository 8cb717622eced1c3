"""Double-buffered shared-memory weight slots (the ``shm`` transport's data plane, CPU).

The writer (learner rank 0) puts version v into slot ``v % 2``; readers (engines, logprob)
copy out of it. Each slot is a file in ``/dev/shm`` (tmpfs: RAM, no disk), mapped with
``mmap``, laid out as::

    [0:8)    seq      u64  even: stable; odd: a write is in progress (seqlock)
    [8:16)   version  u64  weight version held
    [16:24)  nbytes   u64  payload bytes
    [64:...)           payload (buckets back to back, as the manifest describes)

Invariants and failure behaviour:
- A reader of version v is never torn: it reads ``seq`` before and after copying and
  raises ``TornRead`` if a writer touched the slot meanwhile (possible only if the writer
  lapped it by two versions); callers then load the newer version instead.
- The writer grows a slot by replacing its file (new generation name), so a reader that
  has a mapping open keeps a consistent (old) view.
- Slot files are removed by ``ShmWeightWriter.close()``; a crashed writer leaves them for
  the next writer of the same run, which truncates and reuses them.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Iterable

import numpy as np

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
HEADER_BYTES = 64
"""Header size; payload starts 64-byte aligned."""
_HDR = struct.Struct("<QQQ")


class TornRead(Exception):
    """The slot changed while it was read; load the newer version instead."""


def run_slot_id(run_name: str, run_dir: str | Path) -> str:
    """Names a run's slots: stable across restarts, distinct across run directories."""
    import zlib

    return f"{run_name}-{zlib.crc32(str(Path(run_dir).resolve()).encode()):08x}"


def slot_path(run_id: str, slot: int, generation: int) -> Path:
    return SHM_DIR / f"conveyor-{run_id}-w{slot}-g{generation}"


class ShmWeightWriter:
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._maps: dict[int, tuple[Path, mmap.mmap, int]] = {}
        self._generation = 0

    def _slot(self, slot: int, nbytes: int) -> tuple[Path, mmap.mmap]:
        have = self._maps.get(slot)
        if have is not None and have[2] >= nbytes:
            return have[0], have[1]
        if have is not None:
            have[1].close()
            have[0].unlink(missing_ok=True)
        self._generation += 1
        path = slot_path(self.run_id, slot, self._generation)
        size = HEADER_BYTES + nbytes
        with open(path, "w+b") as f:
            f.truncate(size)
            mm = mmap.mmap(f.fileno(), size)
        self._maps[slot] = (path, mm, nbytes)
        return path, mm

    def write(self, version: int, buffers: Iterable[memoryview | bytes | np.ndarray], nbytes: int) -> str:
        """Copy ``buffers`` (``nbytes`` in total) into the slot of ``version``; returns its path."""
        path, mm = self._slot(version % 2, nbytes)
        seq = _HDR.unpack_from(mm, 0)[0]
        _HDR.pack_into(mm, 0, seq + 1, version, nbytes)  # odd: writing
        dst = np.frombuffer(mm, np.uint8, nbytes, HEADER_BYTES)
        pos = 0
        for b in buffers:
            src = np.frombuffer(b, np.uint8) if not isinstance(b, np.ndarray) else b.reshape(-1).view(np.uint8)
            dst[pos : pos + src.size] = src
            pos += src.size
        if pos != nbytes:
            raise ValueError(f"wrote {pos} bytes, manifest says {nbytes}")
        del dst
        _HDR.pack_into(mm, 0, seq + 2, version, nbytes)  # even: stable
        return str(path)

    def close(self) -> None:
        for path, mm, _ in self._maps.values():
            mm.close()
            path.unlink(missing_ok=True)
        self._maps.clear()


class ShmWeightReader:
    """Maps slot files on demand and copies a version out without tearing."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def _map(self, path: str) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is None:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[path] = mm
        return mm

    def read(self, path: str, version: int) -> np.ndarray:
        """A private copy of the payload of ``version`` (uint8 array)."""
        mm = self._map(path)
        seq0, v, nbytes = _HDR.unpack_from(mm, 0)
        if seq0 % 2 or v != version:
            raise TornRead(f"{path}: holds version {v} (seq {seq0}), wanted {version}")
        out = np.frombuffer(mm, np.uint8, nbytes, HEADER_BYTES).copy()
        if _HDR.unpack_from(mm, 0)[0] != seq0:
            raise TornRead(f"{path}: overwritten while reading version {version}")
        return out

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()


def remove_run_slots(run_id: str) -> None:
    """Delete every slot file of a run (the supervisor calls this at the end)."""
    for p in SHM_DIR.glob(f"conveyor-{run_id}-w*"):
        p.unlink(missing_ok=True)
