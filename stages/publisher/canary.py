"""The canary: a fixed prompt whose teacher-forced logprobs the learner and every engine compute.

After each update every engine runs the canary on the version it just loaded and reports
the logprobs in its ``WeightsLoaded``; learner rank 0 computes them at publish time on the
weights it publishes (``WeightsOffer.canary_logprobs``); the publisher logs the gap. A gap
far above the numerical noise of the two forward implementations (fp32: ~1e-6; bf16
engines against fp32 masters: ~1e-2) means an engine computes with other weights than the
learner's: a wrong mapping, a missed update, a broken kernel.

Invariants: the ids are the same everywhere (the shipped character tokenizer, whose ids fit
every built-in vocabulary), the logprobs are at temperature 1, ``float32 [len(ids) - 1]``.
"""

from __future__ import annotations

import numpy as np
import torch

CANARY_TEXT = "canary: 3141592653 + 2718281828 = 5859874481"
"""Digits and operators, as in the built-in tasks: tokens the models actually train on."""


def canary_ids() -> np.ndarray:
    from stages.model import BOS_ID, load_tokenizer

    return np.asarray([BOS_ID, *load_tokenizer().encode(CANARY_TEXT).ids], dtype=np.int32)


def teacher_forced_logprobs(model: torch.nn.Module, ids: np.ndarray, device: torch.device | str) -> np.ndarray:
    """logprob of ``ids[t+1]`` given ``ids[:t+1]`` under ``model``. For an FSDP model this is
    collective: every rank must call it with the same ids."""
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=device).reshape(1, -1)
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0].cpu().numpy().astype(np.float32)
