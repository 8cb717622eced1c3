"""Building the learner's model on FSDP2: meta init, shard, load once on rank 0, broadcast.

Steps: build the architecture on the meta device (no memory), ``fully_shard`` every
decoder layer and the root, materialise empty shards on the target device, then load the
full state from rank 0 only (``set_model_state_dict(..., full_state_dict=True,
broadcast_from_rank0=True)``) and recompute non-persistent buffers (rotary ``inv_freq``),
which are not in any state dict and are garbage after ``to_empty``.

Invariants:
- Master weights are fp32 everywhere. On CUDA, compute runs in bf16 with fp32 gradient
  reduction (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); on CPU
  everything is fp32 (no silent pure-bf16 anywhere).
- The result equals ``build_model(name, seed=seed)`` loaded normally (tested).
- Activation checkpointing wraps each decoder layer (non-reentrant). MoE layers then need a
  deterministic graph across recompute; Qwen3-MoE's HF block loops over experts that
  received tokens, a data-dependent tensor count that recompute can change when routing
  flips; ``deterministic_moe`` replaces that loop with one over all experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import transformers
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from stages.model import build_model, is_moe, model_config


def _restore_rotary(model: torch.nn.Module, device: torch.device) -> None:
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            with torch.device(device):
                fresh = type(module)(config=module.config)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(module, name, buf.to(device))


def deterministic_moe(model: torch.nn.Module) -> None:
    """Make every MoE block run all experts (masked), so recompute sees the same graph."""
    for module in model.modules():
        experts = getattr(module, "experts", None)
        gate = getattr(module, "gate", None)
        if experts is None or gate is None:
            continue
        module.forward = _dense_moe_forward.__get__(module)


def _dense_moe_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    """Qwen3-MoE block, every expert computed and weighted by its (mostly zero) routing
    weight: same output as the sparse loop, with a graph that never depends on routing."""
    b, t, d = hidden.shape
    x = hidden.reshape(-1, d)
    _, top_w, top_i = self.gate(x)  # the router itself stays, so router logits are recorded
    dense_w = torch.zeros(x.shape[0], self.experts.num_experts, dtype=top_w.dtype, device=x.device)
    dense_w = dense_w.scatter(-1, top_i, top_w)
    e = self.experts  # gate_up_proj [E, 2I, D], down_proj [E, D, I]
    gate, up = torch.einsum("nd,ehd->enh", x, e.gate_up_proj).chunk(2, dim=-1)
    h = torch.einsum("enh,edh->end", e.act_fn(gate) * up, e.down_proj)
    out = torch.einsum("end,ne->nd", h, dense_w.to(h.dtype))
    return out.reshape(b, t, d)


def checkpoint_layers(model: torch.nn.Module) -> None:
    for layer in model.model.layers:
        layer.forward = _checkpointed(layer.forward)


def _checkpointed(fwd):
    def run(*args, **kwargs):
        return checkpoint(fwd, *args, use_reentrant=False, **kwargs)
    return run


def build_sharded(name: str, *, device: torch.device, seed: int = 0, mixed_precision: bool | None = None,
                  activation_checkpointing: bool = False) -> transformers.PreTrainedModel:
    """The FSDP2-sharded training model (requires an initialised process group)."""
    config = model_config(name)
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if is_moe(config):
        deterministic_moe(model)
    if activation_checkpointing:
        checkpoint_layers(model)
    use_mp = device.type == "cuda" if mixed_precision is None else mixed_precision
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_mp else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    full = build_model(name, seed=seed).state_dict() if dist.get_rank() == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    _restore_rotary(model, device)
    return model.train()


def full_parameters(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Collective. Rank 0 gets every parameter (deduplicated, as ``named_parameters``) on
    CPU in ``dtype``; other ranks get {}."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return {}
    names = [n for n, _ in model.named_parameters()]
    return {n: sd[n].to(dtype) for n in names}
