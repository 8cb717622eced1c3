"""Every stack file shipped under ops/ loads and validates (``ops/stack.toml`` is the default)."""

import os
import tomllib
from pathlib import Path

import pytest

from schemas.stack import dump_stack, load_stack, write_stack_toml

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "ops").glob("**/*.toml"))
DEFAULT = ROOT / "ops" / "stack.toml"


@pytest.mark.skipif(not DEFAULT.exists(), reason="no ops/stack.toml in this checkout yet")
def test_the_default_stack_is_among_the_files():
    assert DEFAULT in FILES


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_stack_file_loads(path):
    stack = load_stack(path)
    assert stack.run.dir, f"{path}: run.dir not resolved"


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_a_written_variant_loads_back_equal_but_for_the_run_fields_set(path, tmp_path):
    raw = tomllib.loads(path.read_text())
    variant = load_stack(write_stack_toml(raw, tmp_path / "v.toml", max_staleness=0, record=["rollouts"]))
    original = load_stack(path)
    assert (variant.run.max_staleness, variant.run.record) == (0, ["rollouts"])
    variant.run.max_staleness, variant.run.record = original.run.max_staleness, original.run.record
    assert dump_stack(variant) == dump_stack(original)


def test_nested_tables_are_refused(tmp_path):
    with pytest.raises(ValueError, match="nested"):
        write_stack_toml({"rollout": {"engine_args": {"a": 1}}}, tmp_path / "v.toml")


def test_worker_nice_yields_the_cpu_to_a_cpu_learner_only(tmp_path):
    from pipeline.supervisor import WORKER_NICE_ON_CPU, worker_nice
    from schemas.stack import StackError

    cpu = load_stack(DEFAULT)
    assert cpu.learner.device == "cpu" and cpu.run.worker_nice is None
    assert {k: worker_nice(cpu, k) for k in ("source", "rollout", "reward", "logprob", "learner", "publisher")} == {
        "source": 0, "rollout": WORKER_NICE_ON_CPU, "reward": WORKER_NICE_ON_CPU,
        "logprob": WORKER_NICE_ON_CPU, "learner": 0, "publisher": 0}  # the source gates all generation
    gpu = load_stack(ROOT / "ops" / "gpu.toml")
    assert worker_nice(gpu, "rollout") == 0  # vLLM's scheduler shares no cores with a busy learner there
    raw = tomllib.loads(DEFAULT.read_text())
    raw["run"]["worker_nice"] = 5
    assert worker_nice(load_stack(write_stack_toml(raw, tmp_path / "n5.toml")), "reward") == 5
    raw["run"]["worker_nice"] = -1
    with pytest.raises(StackError, match="run.worker_nice"):
        load_stack(write_stack_toml(raw, tmp_path / "bad.toml"))


def test_learner_cpus_pin_a_one_thread_cpu_learner_only(tmp_path):
    from pipeline.supervisor import learner_cpus
    from schemas.stack import StackError

    usable = sorted(os.sched_getaffinity(0))
    cpu = load_stack(DEFAULT)
    assert cpu.run.learner_cpus is None
    assert learner_cpus(cpu, "1") == (usable[:1] if len(usable) > 1 else [])
    assert learner_cpus(cpu, "2") == []  # a learner with threads to spread keeps every core
    assert learner_cpus(load_stack(ROOT / "ops" / "gpu.toml"), "1") == []
    raw = tomllib.loads(DEFAULT.read_text())
    raw["run"]["learner_cpus"] = []
    assert learner_cpus(load_stack(write_stack_toml(raw, tmp_path / "none.toml")), "1") == []
    raw["run"]["learner_cpus"] = [usable[-1]]
    assert learner_cpus(load_stack(write_stack_toml(raw, tmp_path / "last.toml")), "4") == [usable[-1]]
    raw["run"]["learner_cpus"] = [usable[-1] + 4096]
    with pytest.raises(ValueError, match="may only use CPUs"):
        learner_cpus(load_stack(write_stack_toml(raw, tmp_path / "absent.toml")), "1")
    for bad in ([-1], [usable[0], usable[0]]):
        raw["run"]["learner_cpus"] = bad
        with pytest.raises(StackError, match="run.learner_cpus"):
            load_stack(write_stack_toml(raw, tmp_path / "bad.toml"))
