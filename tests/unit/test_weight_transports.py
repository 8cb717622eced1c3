"""Weight transports end to end on CPU: sender → offer → loader → engine → acknowledgement.

shm in one process (two updates while 64 sequences generate, refusals, lapped slots); the
nccl transport over gloo across real processes (bit-exact, an engine stalling mid-update
aborts the version on every engine, the group is rebuilt and the next version applies).
"""

import asyncio
import time
import uuid

import numpy as np
import pytest
import torch

from pipeline.endpoints import free_port
from stages.model import build_model
from stages.publisher.canary import canary_ids, teacher_forced_logprobs
from stages.publisher.core import PublisherCore
from stages.publisher.senders import NcclSender, ShmSender
from stages.publisher.shm import remove_run_slots
from stages.rollout.engines.base import SamplingParams
from stages.rollout.engines.torch_engine import TorchEngine
from stages.rollout.weights import WeightLoader
from stages.testing import weight_params

SMALL_BUCKETS = 64 * 1024
"""Several buckets for the tiny model (~0.5 MB), so per-bucket phases are exercised."""


@pytest.fixture(scope="module", autouse=True)
def one_compute_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shm_sender():
    s = ShmSender(f"test-{uuid.uuid4().hex[:8]}", SMALL_BUCKETS, deadline_s=5.0)
    yield s
    s.close()
    remove_run_slots(s.writer.run_id)


def with_canary(offer, seed):
    import msgspec

    ids = canary_ids()
    return msgspec.structs.replace(offer, canary_ids=ids,
                                   canary_logprobs=teacher_forced_logprobs(build_model("tiny", seed=seed), ids, "cpu"))


async def test_shm_two_updates_while_64_sequences_generate(shm_sender):
    engine = TorchEngine(build_model("tiny", seed=0), max_batch=64)
    loader = WeightLoader(engine, "rollout/0")
    core = PublisherCore({"rollout/0"})
    reqs = [asyncio.ensure_future(engine.generate(f"g{i}", np.array([1, 5 + i]), SamplingParams(max_tokens=60, n=8)))
            for i in range(8)]
    for version, seed in ((1, 11), (2, 12)):
        target = len(engine.active[0].out.token_ids) + 10 if engine.active else 10
        while not engine.active or len(engine.active[0].out.token_ids) < target:
            await asyncio.sleep(0.002)
        offer = with_canary(shm_sender.stage(weight_params(seed), version), seed)
        core.offer(offer, time.monotonic())
        ack = await loader.apply(offer)
        assert ack.ok and ack.digests == [b.digest for b in offer.manifest.buckets], ack.error
        assert core.loaded(ack).version == version
        mean, mx = core.canary(await loader.canary_report(offer))
        assert mx < 1e-4 and core.canaries[version] == {"rollout/0": (mean, mx)}  # same fp32 weights
    outs = await asyncio.gather(*reqs)
    await engine.stop()
    loader.close()
    comps = [c for o in outs for c in o]
    assert len(comps) == 64 and all(c.finish_reason == "length" and len(c.token_ids) == 60 for c in comps)
    assert all([v for _, v in c.version_spans] == [0, 1, 2] for c in comps)
    got = dict(engine.model.named_parameters())
    assert all(torch.equal(p, got[n]) for n, p in weight_params(12).items())  # bit-exact


async def test_a_mismatched_manifest_is_refused_with_names_and_generation_goes_on(shm_sender):
    engine = TorchEngine(build_model("tiny", seed=0), max_batch=4)
    loader = WeightLoader(engine, "rollout/0")
    state = weight_params(5)
    state["model.norm.weight"] = torch.zeros(3)
    del state["model.layers.1.mlp.up_proj.weight"]
    ack = await loader.apply(shm_sender.stage(state, 1))
    assert not ack.ok and ack.version == 1
    assert "model.norm.weight: shape" in ack.error and "model.layers.1.mlp.up_proj.weight: missing" in ack.error
    [c] = await engine.generate("r", np.array([1, 5]), SamplingParams(max_tokens=4, seed=0))
    assert engine.weight_version == 0 and c.version_spans == [(0, 0)] and not engine.paused
    ack = await loader.apply(shm_sender.stage(weight_params(5), 2))  # the next good version applies
    assert ack.ok and engine.weight_version == 2
    await engine.stop()
    loader.close()


async def test_a_lapped_slot_is_skipped_and_a_vanished_one_reported(shm_sender):
    engine = TorchEngine(build_model("tiny", seed=0), max_batch=4)
    loader = WeightLoader(engine, "rollout/0")
    first = shm_sender.stage(weight_params(1), 1)
    shm_sender.stage(weight_params(2), 2)
    third = shm_sender.stage(weight_params(3), 3)  # version 1's slot now holds version 3
    assert await loader.apply(first) is None and engine.weight_version == 0 and not engine.paused
    assert (await loader.apply(third)).ok and engine.weight_version == 3
    import msgspec

    gone = msgspec.structs.replace(third, manifest=msgspec.structs.replace(third.manifest, version=5),
                                   location=third.location + "-gone")
    ack = await loader.apply(gone)
    assert not ack.ok and "cannot read" in ack.error and engine.weight_version == 3 and not engine.paused
    await engine.stop()
    loader.close()


async def test_a_newer_learner_epoch_replaces_higher_versions_and_an_older_one_is_ignored(shm_sender):
    """Learner epoch 1 published v28 and died; epoch 2 resumed its step-20 checkpoint. The
    engine leaves v28 for epoch 2's v20 (spans say 20 from then on); epoch 1 is dead."""
    import msgspec

    def staged(seed, version, epoch):
        return msgspec.structs.replace(shm_sender.stage(weight_params(seed), version), learner_epoch=epoch)

    engine = TorchEngine(build_model("tiny", seed=0), max_batch=4)
    loader = WeightLoader(engine, "rollout/0")
    core = PublisherCore({"rollout/0"})
    req = asyncio.ensure_future(engine.generate("g", np.array([1, 5]), SamplingParams(max_tokens=60)))
    for seed, version, epoch, tokens in ((28, 28, 1, 10), (20, 20, 2, 20)):
        while not engine.active or len(engine.active[0].out.token_ids) < tokens:
            await asyncio.sleep(0.002)
        offer = staged(seed, version, epoch)
        assert core.offer(offer, time.monotonic()) is offer
        ack = await loader.apply(offer)
        assert ack.ok and ack.learner_epoch == epoch, ack.error
        ready = core.loaded(ack)
        assert (ready.version, ready.learner_epoch) == (version, epoch)
        assert (engine.weight_version, loader.live_epoch) == (version, epoch)
    [c] = await req
    assert [v for _, v in c.version_spans] == [0, 28, 20] and c.finish_reason == "length"
    assert await loader.apply(staged(29, 29, 1)) is None  # a late offer of the dead learner
    assert await loader.apply(staged(19, 19, 2)) is None  # within an epoch, versions only go up
    assert await loader.apply(staged(20, 20, 3)) is not None  # a restart at the same version reloads
    assert (engine.weight_version, loader.live_epoch) == (20, 3)
    got = dict(engine.model.named_parameters())
    assert all(torch.equal(p, got[n]) for n, p in weight_params(20).items())
    await engine.stop()
    loader.close()


def test_nccl_transport_over_gloo_stalled_engine_aborts_everywhere_then_next_version_applies():
    """Learner rank 0 (this process, ``NcclSender`` with gloo) and two engine processes.
    Version 1 loads bit-exact; while loading version 2, rollout/1 stalls before its second
    bucket for longer than a phase deadline: the sender's broadcast times out, the group is
    aborted, both engines abort the update and keep version 1 while generating; version 3
    goes to a rebuilt group and loads bit-exact on both."""
    import torch.multiprocessing as mp

    from stages.testing import weight_engine_process

    ctx = mp.get_context("spawn")
    names = ["rollout/0", "rollout/1"]
    offer_qs = {n: ctx.Queue() for n in names}
    acks = ctx.Queue()
    deadline = 2.0
    procs = [ctx.Process(target=weight_engine_process, args=(n, offer_qs[n], acks, (2, 3 * deadline) if n == "rollout/1" else None))
             for n in names]
    for p in procs:
        p.start()
    sender = NcclSender(names, "127.0.0.1", free_port(), bucket_bytes=SMALL_BUCKETS, deadline_s=deadline, device="cpu")
    results: dict[int, dict] = {}
    try:
        assert sorted(acks.get(timeout=180)[:2] for _ in names) == [(n, "ready") for n in names]
        for version in (1, 2, 3):
            offer = sender.stage(weight_params(version + 40), version)
            assert offer.group.group_id.endswith(":0" if version < 3 else ":1")
            for n in names:
                offer_qs[n].put(offer)
            sender.deliver()
            got = [acks.get(timeout=120) for _ in names]
            assert sender.wait(30)
            results[version] = {name: (ack, live, differing) for name, ack, live, differing in got}
            results[version]["sender_error"] = sender.last_error
            results[version]["digests"] = [b.digest for b in offer.manifest.buckets]
        for n in names:
            offer_qs[n].put(None)
        spans = dict((name, s) for name, _, s in (acks.get(timeout=60) for _ in names))
    finally:
        sender.close()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    for version in (1, 3):
        for n in names:
            ack, live, differing = results[version][n]
            assert ack.ok and live == version and differing == [], (version, n, ack.error)
            assert ack.digests == results[version]["digests"]
        assert results[version]["sender_error"] == ""
    assert "version 2" in results[2]["sender_error"]
    for n in names:
        ack, live, _ = results[2][n]
        assert not ack.ok and live == 1 and ack.error.startswith("buckets:"), (n, ack.error)
    for n in names:
        versions = {v for s in spans[n] for _, v in s}
        assert 2 not in versions and {1, 3} <= versions, (n, versions)  # generation went on; never on 2


def test_ipc_handles_have_one_wire_form_and_the_ipc_sender_waits_for_settling():
    """The offer's ``CudaIpcHandle`` and the vLLM worker's ``IpcBucketHandle`` are the same
    fields (the loader converts one into the other); a CUDA IPC buffer is refilled only
    after its version settled or its update budget ran out (checked without CUDA)."""
    import threading

    import msgspec

    from schemas.messages import CudaIpcHandle
    from stages.publisher.senders import CudaIpcSender
    from stages.rollout.engines.vllm_worker import IpcBucketHandle

    assert CudaIpcHandle.__struct_fields__ == IpcBucketHandle.__struct_fields__
    h = IpcBucketHandle("GPU-1234", [4096], [1], 0, "uint8", b"\x01" * 64, 4096, 0, b"ref", 8, b"ev", True)
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(h), type=CudaIpcHandle)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(wire), type=IpcBucketHandle) == h

    sender = CudaIpcSender(deadline_s=1.0, device="cpu")  # only stage() touches CUDA
    sender._pending = (5, time.monotonic() + 30)
    threading.Timer(0.2, sender.settled, args=(5,)).start()
    t0 = time.monotonic()
    assert sender.wait_settled() and time.monotonic() - t0 < 5
    sender._pending = (6, time.monotonic() + 0.3)  # never settled: the budget bounds the wait
    t0 = time.monotonic()
    assert not sender.wait_settled() and 0.25 < time.monotonic() - t0 < 5


async def test_shm_adoption_copies_nothing_holds_its_slot_and_a_copying_load_privatizes(shm_sender):
    """A CPU engine whose dtypes match takes the shm payload as its parameters (fused q/k/v
    and gate/up as views too) and keeps that slot held: a writer lapping it goes to a fresh
    file. Loading another version lets go of the old slot; a load that must copy (dtype
    cast) gives the parameters private storage again."""
    ids = canary_ids()
    engine = TorchEngine(build_model("tiny", seed=0), max_batch=4)
    loader = WeightLoader(engine, "rollout/0")
    first = shm_sender.stage(weight_params(11), 1)
    assert (await loader.apply(first)).ok and engine.adopted and loader.holding == {first.location}
    payload = loader.reader.hold(first.location, 1)
    base = payload.ctypes.data
    params = dict(engine.model.named_parameters())
    assert all(base <= p.data_ptr() < base + payload.nbytes for p in params.values())  # no copy
    layer = engine.decoder.layers[0]
    assert layer.qkv_w.data_ptr() == params["model.layers.0.self_attn.q_proj.weight"].data_ptr()
    assert layer.gate_up_w.data_ptr() == params["model.layers.0.mlp.gate_proj.weight"].data_ptr()
    want = teacher_forced_logprobs(build_model("tiny", seed=11), ids, "cpu")
    assert np.array_equal(await engine.teacher_forced_logprobs(ids), want)
    ref = TorchEngine(build_model("tiny", seed=11), max_batch=4)
    sp = SamplingParams(max_tokens=12, n=2, seed=3)
    got, exp = await engine.generate("a", np.array([1, 7]), sp), await ref.generate("a", np.array([1, 7]), sp)
    assert [c.token_ids for c in got] == [c.token_ids for c in exp]  # fused views decode as the copies do

    shm_sender.stage(weight_params(12), 2)  # the other slot: in place
    replaced = shm_sender.writer.replaced
    third = shm_sender.stage(weight_params(13), 3)  # laps version 1's slot, which the engine holds
    assert shm_sender.writer.replaced == replaced + 1 and third.location != first.location
    assert np.array_equal(await engine.teacher_forced_logprobs(ids), want)  # untouched
    assert (await loader.apply(third)).ok and loader.holding == {third.location}
    assert np.array_equal(await engine.teacher_forced_logprobs(ids),
                          teacher_forced_logprobs(build_model("tiny", seed=13), ids, "cpu"))

    half = {n: p.to(torch.bfloat16) for n, p in weight_params(14).items()}
    fourth = shm_sender.stage(half, 4)
    assert not engine.adopts_shm(fourth.manifest)
    assert (await loader.apply(fourth)).ok and not engine.adopted and loader.holding == set()
    params = dict(engine.model.named_parameters())
    assert all(not base <= p.data_ptr() < base + payload.nbytes for p in params.values())
    assert all(torch.equal(params[n], p.float()) for n, p in half.items())
    replaced = shm_sender.writer.replaced
    shm_sender.stage(weight_params(15), 5)  # nothing held any more: in place
    assert shm_sender.writer.replaced == replaced
    await engine.stop()
    await ref.stop()
    loader.close()
