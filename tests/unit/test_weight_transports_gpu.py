"""cuda_ipc and nccl weight transports with the torch engine on CUDA, end to end, bit-exact.

Learner rank 0 is this process (``CudaIpcSender`` / ``NcclSender``), the engine another
process (``stages.testing.weight_engine_process``: a CUDA ``TorchEngine`` behind a
``WeightLoader``, generating while it loads). Skipped without CUDA (nccl: without 2 GPUs;
NCCL refuses two ranks on one GPU). Run on the GPU machine with
``python -m pytest -q tests/unit/test_weight_transports_gpu.py``.
"""

import pytest
import torch

from pipeline.endpoints import free_port
from stages.publisher.senders import CudaIpcSender, NcclSender
from stages.testing import weight_params

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BUCKET_BYTES = 128 * 1024
"""Several buckets for the tiny model, so per-bucket handles, broadcasts and digests are exercised."""


def start_engine(device: str, stall=None):
    import torch.multiprocessing as mp

    from stages.testing import weight_engine_process

    ctx = mp.get_context("spawn")
    offers, acks = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=weight_engine_process, args=("rollout/0", offers, acks, stall, device))
    proc.start()
    assert acks.get(timeout=300)[1] == "ready"
    return proc, offers, acks


def stop_engine(proc, offers, acks) -> list:
    offers.put(None)
    _, _, spans = acks.get(timeout=120)
    proc.join(60)
    if proc.is_alive():
        proc.kill()
    return spans


def test_cuda_ipc_through_sender_and_loader_bit_exact_and_buffers_reused():
    proc, offers, acks = start_engine("cuda:0")
    sender = CudaIpcSender(BUCKET_BYTES, deadline_s=60.0, device="cuda:0")
    try:
        for version in (1, 2, 3):
            state = weight_params(version + 40)
            if version == 3:  # a learner whose full state is already on the GPU
                state = {n: t.cuda() for n, t in state.items()}
            offer = sender.stage(state, version)
            assert len(offer.ipc_handles) == len(offer.manifest.buckets) > 1
            assert all(b.digest.startswith("g1:") for b in offer.manifest.buckets)
            offers.put(offer)
            _, ack, live, differing = acks.get(timeout=120)
            assert ack.ok, ack.error
            assert live == version and differing == [] and ack.digests == [b.digest for b in offer.manifest.buckets]
            sender.settled(version)
        spans = stop_engine(proc, offers, acks)
    finally:
        sender.close()
        if proc.is_alive():
            proc.kill()
    assert {v for s in spans for _, v in s} >= {3}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_through_sender_and_loader_bit_exact():
    proc, offers, acks = start_engine("cuda:1")
    sender = NcclSender(["rollout/0"], "127.0.0.1", free_port(), bucket_bytes=BUCKET_BYTES, deadline_s=60.0,
                        device="cuda:0")
    try:
        for version in (1, 2):
            offer = sender.stage(weight_params(version + 40), version)
            assert offer.group.backend == "nccl"
            offers.put(offer)
            sender.deliver()
            _, ack, live, differing = acks.get(timeout=180)
            assert sender.wait(120) and sender.last_error == ""
            assert ack.ok, ack.error
            assert live == version and differing == [] and ack.digests == [b.digest for b in offer.manifest.buckets]
        stop_engine(proc, offers, acks)
    finally:
        sender.close()
        if proc.is_alive():
            proc.kill()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_engine_stalling_mid_update_aborts_the_communicator_and_the_next_version_applies():
    deadline = 5.0
    proc, offers, acks = start_engine("cuda:1", stall=(2, 3 * deadline))
    sender = NcclSender(["rollout/0"], "127.0.0.1", free_port(), bucket_bytes=BUCKET_BYTES, deadline_s=deadline,
                        device="cuda:0")
    try:
        results = {}
        for version in (1, 2, 3):
            offer = sender.stage(weight_params(version + 40), version)
            offers.put(offer)
            sender.deliver()
            _, ack, live, differing = acks.get(timeout=180)
            assert sender.wait(120)
            results[version] = (ack, live, differing, sender.last_error, offer.group.group_id)
        spans = stop_engine(proc, offers, acks)
    finally:
        sender.close()
        if proc.is_alive():
            proc.kill()
    assert results[1][0].ok and results[1][1] == 1 and results[1][2] == []
    assert not results[2][0].ok and results[2][1] == 1 and "version 2" in results[2][3]
    assert results[3][0].ok and results[3][1] == 3 and results[3][2] == [] and results[3][3] == ""
    assert results[3][4] != results[1][4]  # a rebuilt communicator under a new group id
    assert 2 not in {v for s in spans for _, v in s}
