"""Supervisor with fake stages: restart after kill -9, bounded SIGTERM, lossless scaling."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.supervisor import Supervisor
from schemas.stack import load_stack
from stages.testing import FAKE_TARGETS, wait_until

STACK = """
[run]
name = "fake"
[source]
[rollout]
replicas = {rollout}
[reward]
[logprob]
[learner]
[publisher]
"""


def fake_stack(tmp_path: Path, rollout: int = 1):
    p = tmp_path / "stack.toml"
    p.write_text(STACK.format(rollout=rollout))
    return load_stack(p)


def received(run_dir: Path) -> list[str]:
    f = run_dir / "fake_received.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0); it is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_killed_replica_is_restarted_and_the_stack_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_ITEMS", "0")
    sup = Supervisor(fake_stack(tmp_path, rollout=2), tmp_path / "run", targets=FAKE_TARGETS)

    async def scenario(sup):
        run = tmp_path / "run"
        await wait_until(lambda: len(received(run)) > 20, 60, "first items")
        victim = sup.pids()["rollout/1"]
        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: sup.pids().get("rollout/1") not in (None, victim), 30, "restart")
        before = len(received(run))
        await wait_until(lambda: len(received(run)) > before + 20, 60, "progress after restart")
        assert sum(len(r.restarts) for r in sup.replicas["rollout"]) == 1
        sup.stop.set()

    assert await sup.run(on_tick=scenario) == 0


async def test_scale_up_and_down_under_load_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_ITEMS", "300")
    monkeypatch.setenv("FAKE_WORK_S", "0.02")
    sup = Supervisor(fake_stack(tmp_path, rollout=1), tmp_path / "run", targets=FAKE_TARGETS)
    run = tmp_path / "run"

    async def scenario(sup):
        await wait_until(lambda: len(received(run)) > 20, 60, "first items")
        await sup.scale("rollout", 3)
        await wait_until(lambda: sum(r.alive for r in sup.replicas["rollout"]) == 3, 30, "3 replicas")
        await wait_until(lambda: len(received(run)) > 120, 60, "work on 3 replicas")
        await sup.scale("rollout", 1)
        await wait_until(lambda: len(sup.replicas["rollout"]) == 1, 30, "scale down to 1")
        await wait_until(lambda: len(received(run)) >= 300, 90, "every item")
        sup.stop.set()

    assert await sup.run(on_tick=scenario) == 0
    got = received(run)
    assert sorted(got, key=lambda x: int(x[1:])) == [f"f{i}" for i in range(300)]  # none lost, none twice
    assert all(len(r.restarts) == 0 for rs in sup.replicas.values() for r in rs)  # drains are not crashes


def test_sigterm_stops_every_child_within_ten_seconds(tmp_path):
    (tmp_path / "stack.toml").write_text(STACK.format(rollout=2))
    driver = textwrap.dedent(f"""
        import asyncio, json, sys
        from pathlib import Path
        from pipeline.supervisor import Supervisor
        from schemas.stack import load_stack
        from stages.testing import FAKE_TARGETS, wait_until
        sup = Supervisor(load_stack({str(tmp_path / 'stack.toml')!r}), Path({str(tmp_path / 'run')!r}),
                         targets=FAKE_TARGETS, shutdown_timeout=8.0)
        async def announce(sup):
            while len(sup.pids()) < 7:
                await asyncio.sleep(0.1)
            print(json.dumps(sup.pids()), flush=True)
        sys.exit(asyncio.run(sup.run(on_tick=announce)))
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(proc.stdout.readline())
        assert len(pids) == 7 and all(alive(p) for p in pids.values())
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:  # never leave a stack running behind a failed assertion
        if proc.poll() is None:
            proc.kill()
    while any(alive(p) for p in pids.values()) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert not [n for n, p in pids.items() if alive(p)], "children outlived the supervisor"
    assert time.monotonic() - t0 < 10


def test_children_die_with_a_killed_supervisor(tmp_path):
    (tmp_path / "stack.toml").write_text(STACK.format(rollout=1))
    driver = textwrap.dedent(f"""
        import asyncio, json, sys
        from pathlib import Path
        from pipeline.supervisor import Supervisor
        from schemas.stack import load_stack
        from stages.testing import FAKE_TARGETS, wait_until
        sup = Supervisor(load_stack({str(tmp_path / 'stack.toml')!r}), Path({str(tmp_path / 'run')!r}),
                         targets=FAKE_TARGETS)
        async def announce(sup):
            while len(sup.pids()) < 6:
                await asyncio.sleep(0.1)
            print(json.dumps(sup.pids()), flush=True)
        asyncio.run(sup.run(on_tick=announce))
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(proc.stdout.readline())
    finally:
        proc.kill()  # no chance to clean up: the parent-death signal must do it
        proc.wait(5)
    t0 = time.monotonic()
    while any(alive(p) for p in pids.values()) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert not [n for n, p in pids.items() if alive(p)]


@pytest.mark.parametrize("body, field", [
    ("[run]\nnme = 'x'\n", "nme"),
    ("[source]\n[rollout]\nreplicas = 'two'\n[reward]\n[logprob]\n[learner]\n[publisher]\n", "rollout.replicas"),
    ("[source]\n[rollout]\n[reward]\n[logprob]\n[publisher]\n", "learner"),
    ("[source]\n[rollout]\nreplicas = 0\n[reward]\n[logprob]\n[learner]\n[publisher]\n", "rollout.replicas"),
])
def test_broken_stack_files_exit_2_naming_the_field(tmp_path, body, field):
    p = tmp_path / "broken.toml"
    p.write_text(body)
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "check", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert field in r.stdout.replace("\n", "") and str(p.name) in r.stdout.replace("\n", "")
