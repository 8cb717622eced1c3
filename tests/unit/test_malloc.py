"""pipeline.malloc: a tuned stage process stops faulting its step-sized allocations in anew."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pipeline.malloc import tune_allocator

# Each round holds a few buffers of 0.5-4 MiB (a CPU learner step's activations) and frees
# them, in a thread (its own malloc arena, like the learner's training thread) and in the
# main thread; prints the page faults per round of each once warm.
_ROUNDS = textwrap.dedent("""
    import resource, sys, threading
    if sys.argv[1] == "tuned":
        from pipeline.malloc import tune_allocator
        assert tune_allocator() == "tuned"
    def work(out):
        def once():
            held = [bytearray(n << 10) for n in (3072, 1024, 2048, 512, 4096, 768)]
            del held
        for _ in range(5):
            once()
        r0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(20):
            once()
        out.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - r0) / 20)
    out = []
    t = threading.Thread(target=work, args=(out,))
    t.start()
    t.join()
    work(out)
    print(max(out))
""")


def _faults_per_round(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_",
                                                              "MALLOC_TRIM_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "confstr")
                    or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""), reason="glibc only")
def test_tuned_process_reuses_step_sized_memory_without_faults():
    plain, tuned = _faults_per_round("plain"), _faults_per_round("tuned")
    # 11.5 MiB per round is ~2900 pages: untuned glibc maps (or trims) and faults most of it
    # every round; tuned, the heap keeps it.
    assert plain > 500, f"untuned glibc faulted only {plain} pages a round: this test no longer shows anything"
    assert tuned < 10, f"tuned process still faults {tuned} pages a round"


def test_user_malloc_settings_are_kept():
    assert tune_allocator({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) == "user settings kept"
    assert tune_allocator({"MALLOC_MMAP_THRESHOLD_": "65536"}) == "user settings kept"
