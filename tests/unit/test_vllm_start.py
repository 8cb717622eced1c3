"""VllmEngine's start on the CPU with a fake vLLM (stages.testing.FakeAsyncLLM): the seeded
start goes through the engine's own update path, which re-enters ``start``; it must neither
deadlock (it did on the GPU: an asyncio.Lock is not re-entrant) nor let another caller in
before the seeded weights are live."""

import asyncio

import pytest

from stages.rollout.engines.vllm_engine import VllmEngine
from stages.testing import FakeAsyncLLM, install_fake_vllm


def test_seeded_start_completes_and_loads_version_0(monkeypatch):
    install_fake_vllm(monkeypatch)

    async def main():
        eng = VllmEngine("qwen3-0.6b", init="seeded")
        await asyncio.wait_for(eng.start(), timeout=30)
        await eng.start()  # idempotent
        return eng

    eng = asyncio.run(main())
    [llm] = FakeAsyncLLM.built
    assert llm.rpcs == ["conveyor_describe", "conveyor_load_ipc", "conveyor_finish", "conveyor_release_ipc"]
    assert eng.weight_version == 0 and not eng.paused and not llm.paused


def test_other_callers_wait_for_the_seeded_weights(monkeypatch):
    install_fake_vllm(monkeypatch)
    seen = []

    async def main():
        eng = VllmEngine("qwen3-0.6b", init="seeded")
        first = asyncio.create_task(eng.start())
        await asyncio.sleep(0)  # the first start is under way

        async def second():
            await eng.start()
            seen.append(list(FakeAsyncLLM.built[0].rpcs))

        await asyncio.wait_for(asyncio.gather(first, second()), timeout=30)

    asyncio.run(main())
    assert seen == [["conveyor_describe", "conveyor_load_ipc", "conveyor_finish", "conveyor_release_ipc"]]


def test_a_failed_seeded_load_shuts_the_engine_down_and_the_next_start_builds_again(monkeypatch):
    install_fake_vllm(monkeypatch)
    FakeAsyncLLM.next_fail_rpc = "conveyor_load_ipc"

    async def main():
        eng = VllmEngine("qwen3-0.6b", init="seeded")
        with pytest.raises(RuntimeError, match="conveyor_load_ipc failed"):
            await asyncio.wait_for(eng.start(), timeout=30)
        assert eng.llm is None and FakeAsyncLLM.built[0].shut_down
        FakeAsyncLLM.next_fail_rpc = None
        await asyncio.wait_for(eng.start(), timeout=30)
        return eng

    eng = asyncio.run(main())
    assert len(FakeAsyncLLM.built) == 2 and eng.llm is FakeAsyncLLM.built[1] and eng.weight_version == 0
