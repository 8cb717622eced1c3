"""Shared-memory weight slots: bit-exact, double-buffered, never torn."""

import struct
from pathlib import Path

import numpy as np
import pytest

from stages.publisher.shm import SHM_DIR, ShmWeightReader, ShmWeightWriter, TornRead, remove_run_slots


@pytest.fixture
def writer(request):
    w = ShmWeightWriter(f"test-{request.node.name}")
    yield w
    w.close()
    remove_run_slots(w.run_id)


def test_round_trip_is_bit_exact(writer):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(1000).astype(np.float32)
    b = rng.integers(0, 2**16, 333).astype(np.uint16)
    path = writer.write(1, [a, b.tobytes()], a.nbytes + b.nbytes)
    got = ShmWeightReader().read(path, 1)
    assert got.tobytes() == a.tobytes() + b.tobytes()


def test_double_buffer_keeps_previous_version_readable(writer):
    p1 = writer.write(1, [np.full(10, 1, np.uint8)], 10)
    p2 = writer.write(2, [np.full(10, 2, np.uint8)], 10)
    r = ShmWeightReader()
    assert p1 != p2
    assert (r.read(p1, 1) == 1).all() and (r.read(p2, 2) == 2).all()
    p3 = writer.write(3, [np.full(10, 3, np.uint8)], 10)  # laps slot of version 1
    assert p3 == p1
    with pytest.raises(TornRead):
        r.read(p1, 1)
    assert (r.read(p3, 3) == 3).all()


def test_reader_detects_a_write_in_progress(writer):
    path = writer.write(4, [np.zeros(8, np.uint8)], 8)
    mm = writer._slots[0].mm
    seq = struct.unpack_from("<Q", mm, 0)[0]
    struct.pack_into("<Q", mm, 0, seq + 1)  # a writer is mid-copy
    with pytest.raises(TornRead):
        ShmWeightReader().read(path, 4)


def test_growing_a_slot_moves_it_and_old_mapping_stays_consistent(writer):
    small = writer.write(2, [np.full(16, 7, np.uint8)], 16)
    r = ShmWeightReader()
    assert (r.read(small, 2) == 7).all()
    big = writer.write(4, [np.full(1 << 20, 9, np.uint8)], 1 << 20)
    assert big != small
    assert (r.read(big, 4) == 9).all()


def test_a_slot_held_by_a_reader_is_never_overwritten(writer):
    p1 = writer.write(1, [np.full(64, 1, np.uint8)], 64)
    writer.write(2, [np.full(64, 2, np.uint8)], 64)
    r = ShmWeightReader()
    with r.view(p1, 1) as held:  # an engine loading version 1 while version 3 is written
        p3 = writer.write(3, [np.full(64, 3, np.uint8)], 64)
        assert p3 != p1 and writer.replaced == 1 and (held == 1).all()
    assert (r.read(p3, 3) == 3).all()
    with pytest.raises(OSError):
        r.read(p1, 1)  # the replaced name is gone
    r.close()


def test_a_write_that_fails_midway_leaves_the_slot_unreadable(writer):
    path = writer.write(2, [np.full(32, 2, np.uint8)], 32)
    with pytest.raises(RuntimeError):
        with writer.slot(4, 32) as dst:
            dst[:16] = 4
            raise RuntimeError("writer died")
    with pytest.raises(TornRead, match="seq"):
        ShmWeightReader().read(path, 4)
    assert (ShmWeightReader().read(writer.write(4, [np.full(32, 4, np.uint8)], 32), 4) == 4).all()


def test_a_restarted_writer_leaves_old_mappings_intact_and_removes_old_files(writer):
    old = writer.write(1, [np.full(64, 1, np.uint8)], 64)
    r = ShmWeightReader()
    assert (r.read(old, 1) == 1).all()
    again = ShmWeightWriter(writer.run_id)  # the learner restarted (the old one never closed)
    try:
        new = again.write(3, [np.full(64, 3, np.uint8)], 64)
        assert new != old and not Path(old).exists()
        assert sorted(SHM_DIR.glob(f"conveyor-{writer.run_id}-w*")) == [Path(new)]
        assert (r.read(new, 3) == 3).all()
        with pytest.raises(OSError):
            r.read(old, 1)
    finally:
        again.close()
        r.close()
