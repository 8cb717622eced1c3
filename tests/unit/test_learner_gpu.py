"""The learner on CUDA as the GPU stack runs it (FSDP2, bf16 compute over fp32 masters,
compiled decoder layers): shared-prompt rows train like a row per completion.

Skipped without CUDA. Run on the GPU machine with
``python -m pytest -q tests/unit/test_learner_gpu.py``.
"""

import msgspec
import numpy as np
import pytest
import torch
import torch.distributed as dist

from schemas.messages import Rollout, ScoredGroup, TrainGroup
from stages.learner.config import LearnerConfig
from stages.learner.trainer import Learner
from stages.testing import make_prompt_group, make_sample

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CFG = LearnerConfig(model="tiny", device="cuda", mixed_precision=True, compile_layers=True, lr=1e-3,
                    micro_batch_tokens=4096, max_staleness=2)


@pytest.fixture(scope="module")
def nccl_rank():
    """A 1-rank NCCL group in this process, as the learner stage makes it (no rendezvous)."""
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda:0"))
    yield
    dist.destroy_process_group()


def _groups() -> list[TrainGroup]:
    out = []
    for g, (prompt_len, lengths) in enumerate([(12, [5, 9, 3, 9, 7, 1, 8, 6]), (30, [20, 4, 17, 11])]):
        group = make_prompt_group(f"g{g}", prompt_len, len(lengths), seed=g)
        samples = [make_sample(n, seed=100 * g + i) for i, n in enumerate(lengths)]
        rewards = np.random.default_rng(g).random(len(lengths), dtype=np.float32)
        out.append(TrainGroup(ScoredGroup(Rollout(group, samples, "rollout/0"), rewards), None))
    return out


def test_shared_prompt_rows_train_like_plain_rows_on_cuda(nccl_rank, tmp_path):
    shared = Learner(msgspec.structs.replace(CFG, run_dir=str(tmp_path / "shared")))
    got = shared.train_step(_groups()).metrics
    # a row per completion
    plain = Learner(msgspec.structs.replace(CFG, run_dir=str(tmp_path / "plain"), shared_row_tokens=0))
    want = plain.train_step(_groups()).metrics
    # bf16 compute: the two layouts sum in different orders (other shapes, other kernels).
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=2e-2)
    assert got["loss"] == pytest.approx(want["loss"], rel=2e-2, abs=1e-3)
    assert got["logprob_gap_mean"] == pytest.approx(want["logprob_gap_mean"], rel=2e-2)
    assert got["tokens"] == want["tokens"] == sum(len(s.token_ids) for g in _groups() for s in g.scored.rollout.samples)
    a, b = shared.full_state_dict(), plain.full_state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 5e-3  # one AdamW step of lr 1e-3
