"""Model and tokenizer building, shared by the engine, logprob and learner stages.

Nothing is downloaded. A model is named either by a built-in shape (random init from a
config shipped here) or by a local Hugging Face checkpoint directory.

Built-in shapes (all Qwen3 architecture):
- ``tiny``: 2 layers, hidden 128; the embedded CPU default, learns the synthetic tasks.
- ``tiny-moe``: the same with Qwen3-MoE blocks (4 experts, top-2) for MoE tests.
- ``qwen3-0.6b`` / ``qwen3-1.7b``: the released models' shapes with random weights, for
  weight-sync and throughput benchmarks.

Invariants: ``build_model(name, seed=s)`` is deterministic for a given name, seed and dtype;
the tokenizer ids fit every built-in vocab (95 < 128).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer

from stages.model.cpu_linear import use_onednn_linears

TOKENIZER_PATH = Path(__file__).with_name("tokenizer.json")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

_TINY = dict(
    vocab_size=95,  # exactly the shipped tokenizer: no sampleable id may decode to nothing
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)
_QWEN3_06B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
    tie_word_embeddings=True, rms_norm_eps=1e-6,
)
_QWEN3_17B = dict(_QWEN3_06B, hidden_size=2048, intermediate_size=6144)

BUILTIN_SHAPES: dict[str, tuple[str, dict]] = {
    "tiny": ("qwen3", _TINY),
    "tiny-moe": ("qwen3_moe", dict(_TINY, num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=128, decoder_sparse_step=1,
                                   mlp_only_layers=[], norm_topk_prob=True,
                                   output_router_logits=False)),
    "qwen3-0.6b": ("qwen3", _QWEN3_06B),
    "qwen3-1.7b": ("qwen3", _QWEN3_17B),
}


def model_config(name: str) -> transformers.PretrainedConfig:
    """Config of a built-in shape or of a local checkpoint directory (``config.json``)."""
    if name in BUILTIN_SHAPES:
        kind, kw = BUILTIN_SHAPES[name]
        return transformers.AutoConfig.for_model(kind, **kw)
    if os.path.isdir(name):
        return transformers.AutoConfig.from_pretrained(name, local_files_only=True)
    raise ValueError(
        f"model {name!r}: not a built-in shape ({', '.join(BUILTIN_SHAPES)}) nor a local directory"
    )


def is_moe(config: transformers.PretrainedConfig) -> bool:
    return getattr(config, "num_experts", 0) > 0 or getattr(config, "num_local_experts", 0) > 0


def build_model(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int = 0) -> transformers.PreTrainedModel:
    """A causal LM in eval mode: random init (seeded) for built-in shapes, or the weights
    of a local checkpoint directory. On CPU in fp32 its linear layers run on oneDNN
    (``stages.model.cpu_linear``: same math, ~2× faster on AMD)."""
    if name in BUILTIN_SHAPES:
        config = model_config(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.to(device)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            name, local_files_only=True, dtype=dtype
        ).to(device)
    if torch.device(device).type == "cpu" and dtype == torch.float32:
        use_onednn_linears(model)
    return model.eval()


@lru_cache(maxsize=1)
def load_tokenizer() -> Tokenizer:
    """The character-level tokenizer shipped with the project (see ``build_tokenizer``)."""
    return Tokenizer.from_file(str(TOKENIZER_PATH))
