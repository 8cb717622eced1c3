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
- Activation checkpointing wraps each decoder layer (non-reentrant, default determinism
  check kept on). MoE layers then need a graph that does not depend on routing: the HF
  Qwen3-MoE experts loop over experts that received tokens (a data-dependent number of
  saved tensors, with data-dependent shapes), which recompute can change when a routing
  tie flips (bf16, non-deterministic kernels) and then fails with a tensor-count mismatch.
  ``deterministic_moe`` replaces that block with a dense one: every expert runs on every
  token, weighted by the (mostly zero) routing weight. Same output as the sparse loop, a
  graph fixed by shapes alone; the price is E/k times the expert FLOPs, acceptable for the
  small MoE configs trained here and documented for large ones (a grouped-GEMM block
  with fixed N·k rows is the scalable alternative).
- On CPU every ``nn.Linear`` runs on oneDNN (``stages.model.cpu_linear``): same fp32 math,
  ~2× MKL's speed on AMD; same parameters and state dict.
- ``compile_layers`` compiles each decoder layer in place after loading (its FSDP2 hooks
  run inside the compiled call; parameter names unchanged). Same results as eager up to
  float rounding (fused kernels sum in another order; tested).
- The inference-only variant (``build_inference``) has frozen parameters and no
  optimizer: it is what the logprob stage holds.

Failure behaviour: everything here is collective; a rank that fails to build leaves the
others blocked in the broadcast until the process group times out, so the shell must
treat a learner rank's death as the whole group's (the supervisor restarts the group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import transformers
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from stages.model import build_model, is_moe, model_config
from stages.model.cpu_linear import use_onednn_linears


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


def _mp_policy(device: torch.device, mixed_precision: bool | None) -> MixedPrecisionPolicy:
    use_mp = device.type == "cuda" if mixed_precision is None else mixed_precision
    if use_mp:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)


def _shard_and_load(name: str, *, device: torch.device, seed: int, mixed_precision: bool | None,
                    activation_checkpointing: bool, reshard_after_forward: bool,
                    compile_layers: bool = False) -> transformers.PreTrainedModel:
    config = model_config(name)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if is_moe(config):
        deterministic_moe(model)
    if device.type == "cpu" and not compile_layers:
        use_onednn_linears(model)  # fp32 on CPU: oneDNN's AVX-512 kernels instead of MKL's AVX2 ones
    if activation_checkpointing:
        checkpoint_layers(model)
    mp = _mp_policy(device, mixed_precision)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    model.to_empty(device=device)
    # The full state exists on rank 0 only (one disk/initialisation read per job); the
    # other ranks receive their shards by broadcast.
    full = build_model(name, seed=seed).state_dict() if dist.get_rank() == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    _restore_rotary(model, device)
    if compile_layers:
        # In place (``Module.compile``): parameter names, hence state dicts, checkpoints and
        # published weights, stay those of the eager model. dynamic=True: micro-batch shapes
        # vary every step and must not recompile each time.
        for layer in model.model.layers:
            layer.compile(dynamic=True)
    return model


def build_sharded(name: str, *, device: torch.device, seed: int = 0, mixed_precision: bool | None = None,
                  activation_checkpointing: bool = False, compile_layers: bool = False) -> transformers.PreTrainedModel:
    """The FSDP2-sharded training model in train mode (requires an initialised process group)."""
    return _shard_and_load(name, device=device, seed=seed, mixed_precision=mixed_precision,
                           activation_checkpointing=activation_checkpointing, reshard_after_forward=True,
                           compile_layers=compile_layers).train()


def build_inference(name: str, *, device: torch.device, seed: int = 0,
                    mixed_precision: bool | None = None) -> transformers.PreTrainedModel:
    """Inference-only variant for the logprob stage: same sharding and load path, eval mode,
    parameters frozen (no gradients, no optimizer state ever exists for it). Call it
    under ``torch.no_grad()``, NOT ``torch.inference_mode()``: FSDP2's unshard preserves
    parameter version counters, which inference tensors lack (RuntimeError). Every rank
    must run the same forwards (they all-gather parameters)."""
    model = _shard_and_load(name, device=device, seed=seed, mixed_precision=mixed_precision,
                            activation_checkpointing=False, reshard_after_forward=True)
    return model.eval().requires_grad_(False)


def full_parameters(model: torch.nn.Module, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Collective. Rank 0 gets every parameter (deduplicated, as ``named_parameters``) in
    ``dtype`` on ``device``; other ranks get {}.

    One rank: ``one_rank_parameters`` (a copy of each local tensor, no collective). Else,
    ``device`` None or CPU: the host path (``host_full_parameters``; what the ``shm`` sender
    packs); any other device: ``gather_full_parameters``, which keeps the state off the host
    (``cuda_ipc``/``nccl`` senders copy it into their CUDA buckets). On every path no
    returned tensor shares storage with the model's (a one-rank CPU gather of an fp32 model
    would hand out the parameters themselves): the caller may read them while the next step
    changes the model. The two multi-rank paths run different collectives, so every rank
    must pass the same kind of device (the outlet derives it from the stack,
    ``senders.staging_device``)."""
    if dist.get_world_size() == 1:
        whole = one_rank_parameters(model, dtype, device)
        if whole is not None:
            return whole
    if device is not None and torch.device(device).type != "cpu":
        return gather_full_parameters(model, dtype, device)
    return host_full_parameters(model, dtype)


def host_full_parameters(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Collective: ``get_model_state_dict`` with ``cpu_offload`` (rank 0 gets the full state
    on the host, others {}), cast to ``dtype``, never the model's own storage."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return {}
    live = {p.to_local().untyped_storage().data_ptr() if isinstance(p, DTensor) else p.untyped_storage().data_ptr()
            for p in model.parameters()}
    out = {}
    for n, _ in model.named_parameters():
        t = sd[n].to(dtype)
        out[n] = t.clone() if t.untyped_storage().data_ptr() in live else t
    return out


def one_rank_parameters(model: torch.nn.Module, dtype: torch.dtype,
                        device: torch.device | str | None) -> dict[str, torch.Tensor] | None:
    """A copy of every parameter (``named_parameters``, in ``dtype`` on ``device``, host when
    None) read straight from the local shards, which on a one-rank mesh are the whole
    parameters: no collective, none of DTensor's redistribution. ``full_parameters`` of the
    default CPU model (24 tensors, 1.6 MB) took 3.5 ms through ``get_model_state_dict``
    alone and ~9 ms beside the rollouts, on the async learner's critical path (the next
    step waits for the read). None when a local tensor is not its parameter's full shape
    (a layout this does not know): the caller takes the general path."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p.detach()
            if local.shape != p.shape:
                return None
            out[name] = local.to(device=device or "cpu", dtype=dtype, copy=True)  # never the model's storage
    return out


def gather_full_parameters(model: torch.nn.Module, dtype: torch.dtype,
                           device: torch.device | str) -> dict[str, torch.Tensor]:
    """Collective. One parameter at a time: all-gather where the shards live
    (``DTensor.full_tensor``; every rank, in ``named_parameters`` order), then on rank 0
    cast to ``dtype`` and move to ``device`` (a no-op when the shards live there: no host
    round trip), freeing the gathered master copy at once. Other ranks drop each gathered
    tensor immediately and get {}, so their extra memory is one full parameter; rank 0's
    is the state in ``dtype`` plus one full parameter. The returned tensors never share
    storage with the model's (a one-rank gather may return the shard itself)."""
    device = torch.device(device)
    rank0 = dist.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            if rank0:
                t = full.to(device=device, dtype=dtype)
                if t.untyped_storage().data_ptr() == local.untyped_storage().data_ptr():
                    t = t.clone()
                out[name] = t
            del full, local
    return out
