"""The fused g1 digest reduction (compiled, what CUDA runs) equals the eager one bit for bit,
overflow included: digests must not depend on which form a sender or a worker ran."""

import pytest
import torch

from stages.rollout.engines.vllm_worker import _slab_sums_eager


@pytest.mark.parametrize("dtype, low, high", [(torch.int32, -2**31, 2**31 - 1), (torch.int16, -2**15, 2**15 - 1),
                                              (torch.uint8, 0, 255)])
def test_compiled_slab_sums_equal_eager_bit_for_bit(dtype, low, high):
    fused = torch.compile(_slab_sums_eager, dynamic=True)
    g = torch.Generator().manual_seed(0)
    for rows, n in ((3, 1000), (1, 1 << 18), (5, 4097)):
        slab = torch.randint(low, high, (rows, n), dtype=dtype, generator=g)
        weights = torch.arange(1, n + 1, dtype=torch.int64) * (1 << 40)  # products and sums wrap
        want, got = _slab_sums_eager(slab, weights), fused(slab, weights)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
