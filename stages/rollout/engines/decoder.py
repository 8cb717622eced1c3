"""Forward passes over a slot KV cache, using a transformers decoder's own weights.

``SlotDecoder`` holds one K/V tensor per layer, ``[max_batch, kv_heads, max_seq_len,
head_dim]``; slot ``i`` belongs to one sequence. Prefill runs a right-padded batch of prompts
and copies each prompt's K/V into the slots that share it; decode runs one token for slots
``0..b-1`` and attends over the cache views ``[:b, :, :span]`` (the caller keeps active
slots packed at the front with ``move_slots``).

Speed: for small models a decode step costs per-op overhead, not FLOPs, so the q/k/v and
gate/up projections run as one matmul each. The fused weight is the *storage* of the
original parameters (their ``.data`` become row views of it), so ``named_parameters``,
``state_dict`` and in-place weight loads are unchanged and need no re-fusing. Norms use
``F.rms_norm`` (one kernel) instead of the module's five ops. Projections go through
``stages.model.cpu_linear.linear``: oneDNN for fp32 on CPU from 32 rows up, else ``F.linear``.

Adopted weights (``adopt``): the parameters become views into a received payload (a
shared-memory weight slot) instead of private storage, and each fused group becomes one
view over its members when they lie back to back in the payload (q, k, v and gate, up do,
in state-dict order), so a weight update copies nothing. That memory is read-only:
``privatize`` gives every parameter private storage again before anything writes into it.

Invariants:
- Logits equal the model's own forward on the same tokens (fp32: to rounding, ~1e-6).
- Supported: Qwen3 / Qwen3-MoE / Llama-style decoders (pre-norm, rotary, optional q/k
  norm, full causal attention). MoE and unknown MLP blocks run through their own module.

Failure behaviour: a config with sliding-window attention or dynamic rope scaling raises
``ValueError`` at construction (the slot cache attends to the whole prefix; rotary cos/sin
are tabulated once for positions ``0..max_seq_len-1``); nothing else is checked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.model.cpu_linear import linear


def _rows_view(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """``parts`` stacked by rows as one view, when they lie back to back in one storage in
    this order (contiguous, same dtype and trailing shape); else None."""
    first = parts[0]
    pos = first.storage_offset()
    for t in parts:
        if (t.dtype != first.dtype or t.shape[1:] != first.shape[1:] or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or t.storage_offset() != pos):
            return None
        pos += t.numel()
    return first.as_strided((sum(t.shape[0] for t in parts), *first.shape[1:]), first.stride(), first.storage_offset())


def _fuse(linears: list[torch.nn.Linear], in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) whose row blocks become the given layers' parameters: a copy
    (``torch.cat``), or with ``in_place`` a view of the members' own memory where they lie
    back to back (``_rows_view``; a copy where they do not)."""
    with torch.no_grad():
        weight = _rows_view([m.weight.data for m in linears]) if in_place else None
        if weight is None:
            weight = torch.cat([m.weight for m in linears])
        has_bias = [m.bias is not None for m in linears]
        bias = None
        if all(has_bias):
            bias = _rows_view([m.bias.data for m in linears]) if in_place else None
            if bias is None:
                bias = torch.cat([m.bias for m in linears])
        row = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = weight[row : row + n]
            if bias is not None:
                m.bias.data = bias[row : row + n]
            row += n
    if any(has_bias) and bias is None:
        raise ValueError("cannot fuse projections where only some have a bias")
    return weight, bias


def _rms(x: torch.Tensor, norm: torch.nn.Module | None) -> torch.Tensor:
    if norm is None:
        return x
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class _Layer:
    """The pieces of one decoder layer the slot forward needs (references, not copies)."""

    def __init__(self, layer: torch.nn.Module, n_heads: int, n_kv: int, head_dim: int) -> None:
        attn = layer.self_attn
        self.ln_in, self.ln_post = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.qkv_linears = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.qkv_w, self.qkv_b = _fuse(self.qkv_linears)
        self.o_proj = attn.o_proj
        self.split = [n_heads * head_dim, n_kv * head_dim, n_kv * head_dim]
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        mlp = layer.mlp
        self.gate_up_linears: list[torch.nn.Linear] = []
        if all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            self.gate_up_linears = [mlp.gate_proj, mlp.up_proj]
            self.gate_up_w, self.gate_up_b = _fuse(self.gate_up_linears)
            self.down, self.act, self.mlp = mlp.down_proj, mlp.act_fn, None
        else:
            self.mlp = mlp

    def refuse(self, in_place: bool) -> None:
        """Re-derive the fused weights from the member parameters (see ``_fuse``)."""
        self.qkv_w, self.qkv_b = _fuse(self.qkv_linears, in_place)
        if self.gate_up_linears:
            self.gate_up_w, self.gate_up_b = _fuse(self.gate_up_linears, in_place)

    def qkv(self, h, cos, sin):
        b, t, _ = h.shape
        q, k, v = linear(_rms(h, self.ln_in), self.qkv_w, self.qkv_b).split(self.split, dim=-1)
        q = _rms(q.view(b, t, self.n_heads, self.head_dim), self.q_norm).transpose(1, 2)
        k = _rms(k.view(b, t, self.n_kv, self.head_dim), self.k_norm).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def finish(self, h, q, k, v, mask):
        b, _, t, _ = q.shape
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv)
        h = h + self.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        x = _rms(h, self.ln_post)
        if self.mlp is not None:
            out = self.mlp(x)
            return h + (out[0] if isinstance(out, tuple) else out)  # MoE blocks may add router logits
        gate, up = linear(x, self.gate_up_w, self.gate_up_b).chunk(2, dim=-1)
        return h + self.down(self.act(gate) * up)


class SlotDecoder:
    def __init__(self, model: torch.nn.Module, max_batch: int, max_seq_len: int) -> None:
        cfg = model.config
        if getattr(cfg, "use_sliding_window", False) or "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
            raise ValueError(f"{cfg.model_type}: sliding-window attention is not supported by the slot cache")
        if getattr(model.model.rotary_emb, "rope_type", "default") == "dynamic":
            raise ValueError(f"{cfg.model_type}: dynamic rope scaling is not supported (rotary tables are fixed)")
        self.model = model
        self.params: dict[str, torch.nn.Parameter] = dict(model.named_parameters())
        """Name → parameter, built once: loads and ``adopt`` swap a parameter's ``.data``,
        never the parameter object, and walking every module costs ~1 ms on the tiny model."""
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab = cfg.vocab_size
        self.layers = [_Layer(layer, self.n_heads, self.n_kv, self.head_dim) for layer in model.model.layers]
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        shape = (max_batch, self.n_kv, max_seq_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        # Rotary cos/sin for every cache position, from the model's own rotary module (the
        # same per-position arithmetic as calling it each step, without its ~10 ops).
        with torch.inference_mode():
            probe = torch.zeros(1, 1, dtype=self.dtype, device=self.device)
            cos, sin = model.model.rotary_emb(probe, torch.arange(max_seq_len, device=self.device)[None])
        self.cos_table, self.sin_table = cos[0], sin[0]

    def adopt(self, tensors: dict[str, torch.Tensor]) -> None:
        """Make ``tensors`` (name → tensor of the parameter's shape and dtype, on its device)
        the model's parameters without copying, then fuse in place (module docstring)."""
        params = self.params
        with torch.no_grad():
            for name, t in tensors.items():
                params[name].data = t
        for layer in self.layers:
            layer.refuse(in_place=True)

    def privatize(self) -> None:
        """Give every parameter private, writable storage again (after ``adopt``)."""
        fused = {id(m.weight) for layer in self.layers for m in layer.qkv_linears + layer.gate_up_linears}
        fused |= {id(m.bias) for layer in self.layers for m in layer.qkv_linears + layer.gate_up_linears
                  if m.bias is not None}
        with torch.no_grad():
            for p in self.model.parameters():
                if id(p) not in fused:
                    p.data = p.data.clone()
        for layer in self.layers:
            layer.refuse(in_place=False)  # torch.cat: fresh storage for every fused member

    def _embed(self, ids: torch.Tensor, pos: torch.Tensor):
        return self.model.model.embed_tokens(ids), self.cos_table[pos][:, None], self.sin_table[pos][:, None]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        head = self.model.lm_head
        return linear(_rms(h, self.model.model.norm), head.weight, head.bias).float()

    @torch.inference_mode()
    def prefill(self, prompts: list[torch.Tensor], slots: list[int], owners: list[int]) -> torch.Tensor:
        """Forward the prompts (one right-padded batch); write prompt ``owners[i]``'s K/V into
        slot ``slots[i]``. Returns fp32 next-token logits per prompt, ``[len(prompts), V]``."""
        lens = [p.numel() for p in prompts]
        width = max(lens)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : lens[i]] = p
        ids = ids.to(self.device)
        pos = torch.arange(width, device=self.device)[None].expand(len(prompts), -1)
        h, cos, sin = self._embed(ids, pos)
        # Causal mask; padding comes after every real token, so it never reaches a real one.
        mask = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()[None, None]
        owner_idx = torch.tensor(owners, device=self.device)
        slot_idx = torch.tensor(slots, device=self.device)
        for layer, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            q, k, v = layer.qkv(h, cos, sin)
            kc[slot_idx, :, :width] = k[owner_idx]
            vc[slot_idx, :, :width] = v[owner_idx]
            h = layer.finish(h, q, k, v, mask)
        last = torch.tensor(lens, device=self.device) - 1
        return self._logits(h[torch.arange(len(prompts), device=self.device), last])

    @torch.inference_mode()
    def decode(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        """One token for each of slots ``0..b-1`` (``lengths[i]`` tokens already cached);
        returns fp32 logits ``[b, V]``."""
        b = len(tokens)
        rows = torch.arange(b, device=self.device)
        pos = torch.tensor(lengths, device=self.device)
        h, cos, sin = self._embed(torch.tensor(tokens, device=self.device)[:, None], pos[:, None])
        span = max(lengths) + 1
        mask = (torch.arange(span, device=self.device)[None] <= pos[:, None])[:, None, None, :]
        for layer, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            q, k, v = layer.qkv(h, cos, sin)
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            h = layer.finish(h, q, kc[:b, :, :span], vc[:b, :, :span], mask)
        return self._logits(h[:, -1])

    def move_slots(self, src: list[int], dst: list[int], length: int) -> None:
        """Copy the first ``length`` cached positions of slots ``src`` into slots ``dst``
        (pairwise), one gather per cache tensor however many slots move."""
        s, d = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        for kc, vc in zip(self.k_cache, self.v_cache):
            kc[d, :, :length] = kc[s, :, :length]  # the gather on the right is a copy: overlap is safe
            vc[d, :, :length] = vc[s, :, :length]
