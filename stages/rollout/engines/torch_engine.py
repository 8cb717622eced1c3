"""Built-in torch engine: continuous batching with a slot KV cache over a transformers model.

How it runs: requests wait in a queue; a step loop (one asyncio task) admits waiting
requests into free cache slots between decode steps (prefill: one forward over the prompt,
its K/V copied into each of the request's ``n`` slots), then decodes one token for every
active slot in a single batched forward, samples, and retires slots that hit a stop id,
``max_tokens`` or the cache length. The decoder layers are the model's own modules
(projections, norms, rotary, MLP or MoE block); only attention over the slot cache is
written here, with ``scaled_dot_product_attention`` and a length mask.

Invariants:
- The logprob of each sampled token is read from the same ``log_softmax(logits / T)`` the
  token was sampled from (top-p only restricts the sampling support), so it equals a
  teacher-forced forward pass at the same temperature.
- Sampling uses one ``torch.Generator`` per request (seeded from ``params.seed`` or the
  engine's ``sampling_seed`` and the request's arrival index): a request's tokens do not
  depend on what else is in the batch.
- Weight updates run between decode steps (the loop holds a lock over each step); spans
  record the version that produced each token.

Failure behaviour: a prompt longer than the cache, or a token id outside the vocabulary,
fails that request with ``ValueError``; the loop keeps serving others. An exception inside
a step fails every request in that step (with the exception) and the loop continues.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from schemas.messages import WeightManifest
from stages.model import build_model, is_moe
from stages.publisher.manifest import check_compatible, load_into, unpack
from stages.rollout.engines.base import Completion, Engine, SamplingParams

MAX_SEQ_LEN = 512
"""Cache length per slot (prompt + completion). The built-in tasks use < 32 tokens."""


@dataclass
class _Seq:
    request: "_Request"
    index: int
    slot: int = -1
    length: int = 0
    """Tokens (prompt + generated) in this slot's cache."""
    last_token: int = 0
    out: Completion = field(default_factory=Completion)


@dataclass
class _Request:
    request_id: str
    prompt: torch.Tensor
    params: SamplingParams
    generator: torch.Generator
    future: asyncio.Future
    seqs: list[_Seq] = field(default_factory=list)
    aborted: bool = False


class TorchEngine(Engine):
    def __init__(self, model: str | torch.nn.Module = "tiny", *, device: str = "cpu", dtype: str = "float32",
                 max_batch: int = 64, seed: int = 0, sampling_seed: int = 0, max_seq_len: int = MAX_SEQ_LEN) -> None:
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if isinstance(model, str):
            model = build_model(model, dtype=self.dtype, device=self.device, seed=seed)
        self.model = model.eval().requires_grad_(False)
        cfg = self.model.config
        self.moe = is_moe(cfg)
        self.n_layers = cfg.num_hidden_layers
        self.n_kv = cfg.num_key_value_heads
        self.n_heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab = cfg.vocab_size
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        shape = (max_batch, self.n_kv, max_seq_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.active: list[_Seq] = []
        """Invariant: ``active[i].slot == i``; finished sequences are compacted away so
        attention reads ``cache[:len(active)]`` as a view, never a gather."""
        self.waiting: list[_Request] = []
        self.requests: dict[str, _Request] = {}
        self._version = 0
        self._pending_version: int | None = None
        self._sampling_seed = sampling_seed
        self._arrivals = itertools.count()
        self._wake = asyncio.Event()
        self._running = asyncio.Event()
        self._running.set()
        self._step_lock = asyncio.Lock()
        self._loop_task: asyncio.Task | None = None
        self.decoded_tokens = 0

    # ------------------------------------------------------------------ public API
    @property
    def weight_version(self) -> int:
        return self._version

    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        for rid in list(self.requests):
            await self.abort(rid)
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None

    async def generate(self, request_id: str, prompt_ids: np.ndarray, params: SamplingParams) -> list[Completion]:
        await self.start()
        prompt = torch.as_tensor(np.asarray(prompt_ids, dtype=np.int64))
        if prompt.numel() == 0 or prompt.numel() >= self.max_seq_len:
            raise ValueError(f"{request_id}: prompt of {prompt.numel()} tokens (need 1..{self.max_seq_len - 1})")
        if int(prompt.max()) >= self.vocab or int(prompt.min()) < 0:
            raise ValueError(f"{request_id}: token id outside the vocabulary of {self.vocab}")
        if params.n > self.max_batch:
            raise ValueError(f"{request_id}: n={params.n} > max_batch={self.max_batch}")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(params.seed if params.seed is not None else self._sampling_seed * 1_000_003 + next(self._arrivals))
        req = _Request(request_id, prompt, params, gen, asyncio.get_running_loop().create_future())
        req.seqs = [_Seq(req, i) for i in range(params.n)]
        self.requests[request_id] = req
        self.waiting.append(req)
        self._wake.set()
        return await req.future

    async def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        req.aborted = True
        if req in self.waiting:
            self.waiting.remove(req)
        for s in req.seqs:
            if not s.out.finish_reason:
                s.out.finish_reason = "abort"
        self._retire_request(req)

    async def pause(self) -> None:
        self._running.clear()
        async with self._step_lock:  # returns once the current step finished
            pass

    async def resume(self) -> None:
        self._running.set()
        self._wake.set()

    async def start_weight_update(self, version: int, manifest: WeightManifest) -> None:
        check_compatible(manifest, dict(self.model.named_parameters()))
        await self.pause()
        self._pending_version = version

    async def update_weights_shm(self, payload: np.ndarray, manifest: WeightManifest) -> list[str]:
        tensors, digests = unpack(manifest, payload)  # verifies every bucket first
        with torch.no_grad():
            load_into(self.model, {n: t.to(self.device) for n, t in tensors.items()})
        return digests

    async def finish_weight_update(self, version: int) -> None:
        self._version = version
        self._pending_version = None
        await self.resume()

    async def abort_weight_update(self) -> None:
        self._pending_version = None
        await self.resume()

    # ------------------------------------------------------------------ step loop
    async def _loop(self) -> None:
        while True:
            if not (self.active or self.waiting) or not self._running.is_set():
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._step_lock:
                if self._running.is_set():
                    try:
                        self._admit()
                        if self.active:
                            self._decode_step()
                    except Exception as e:  # fail this step's requests, keep serving
                        for req in {s.request for s in self.active} | set(self.waiting):
                            self._fail(req, e)
            await asyncio.sleep(0)  # let new requests, aborts and weight updates in

    def _admit(self) -> None:
        batch = []
        free = self.max_batch - len(self.active)
        while self.waiting and free >= self.waiting[0].params.n:
            req = self.waiting.pop(0)
            free -= req.params.n
            batch.append(req)
        if batch:
            self._prefill(batch)

    @torch.inference_mode()
    def _prefill(self, reqs: list[_Request]) -> None:
        """One right-padded forward over the prompts of every admitted request; each
        prompt's K/V is copied into the slots of its ``n`` sequences."""
        lens = [r.prompt.numel() for r in reqs]
        width = max(lens)
        ids = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, : lens[i]] = r.prompt
        ids = ids.to(self.device)
        pos = torch.arange(width, device=self.device)[None].expand(len(reqs), -1)
        h = self.model.model.embed_tokens(ids)
        cos, sin = self.model.model.rotary_emb(h, pos)
        # Causal mask; padded positions come after every real one, so they never leak in.
        mask = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()[None, None]
        first = len(self.active)
        slots, owners = [], []
        for i, r in enumerate(reqs):
            for seq in r.seqs:
                slots.append(first + len(slots))
                owners.append(i)
        owner_idx = torch.tensor(owners, device=self.device)
        slot_idx = torch.tensor(slots, device=self.device)
        for layer_idx, layer in enumerate(self.model.model.layers):
            q, k, v = self._qkv(layer, h, cos, sin)
            self.k_cache[layer_idx][slot_idx, :, :width] = k[owner_idx]
            self.v_cache[layer_idx][slot_idx, :, :width] = v[owner_idx]
            h = self._finish_layer(layer, h, q, k, v, mask)
        last = torch.tensor(lens, device=self.device) - 1
        logits = self._logits(h[torch.arange(len(reqs), device=self.device), last])
        seqs = []
        for r in reqs:
            for seq in r.seqs:
                seq.slot, seq.length = first + len(seqs), r.prompt.numel()
                seq.out.version_spans.append((0, self._version))
                self.active.append(seq)
                seqs.append(seq)
        self._sample_into(seqs, logits[owner_idx])

    @torch.inference_mode()
    def _decode_step(self) -> None:
        seqs = self.active
        b = len(seqs)
        rows = torch.arange(b, device=self.device)
        lengths = torch.tensor([s.length for s in seqs], device=self.device)
        ids = torch.tensor([[s.last_token] for s in seqs], device=self.device)
        h = self.model.model.embed_tokens(ids)
        cos, sin = self.model.model.rotary_emb(h, lengths[:, None])
        span = int(lengths.max()) + 1
        mask = (torch.arange(span, device=self.device)[None] <= lengths[:, None])[:, None, None, :]
        for layer_idx, layer in enumerate(self.model.model.layers):
            q, k, v = self._qkv(layer, h, cos, sin)
            kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
            kc[rows, :, lengths] = k[:, :, 0]
            vc[rows, :, lengths] = v[:, :, 0]
            h = self._finish_layer(layer, h, q, kc[:b, :, :span], vc[:b, :, :span], mask)
        for s in seqs:
            s.length += 1
        self._sample_into(list(seqs), self._logits(h[:, -1]))

    def _qkv(self, layer, h, cos, sin):
        from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

        attn = layer.self_attn
        x = layer.input_layernorm(h)
        b, t, _ = x.shape
        q = attn.q_norm(attn.q_proj(x).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x).view(b, t, self.n_kv, self.head_dim)).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def _finish_layer(self, layer, h, q, k, v, mask):
        b, _, t, _ = q.shape
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv)
        h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        mlp_out = layer.mlp(layer.post_attention_layernorm(h))
        if isinstance(mlp_out, tuple):  # MoE blocks may also return router logits
            mlp_out = mlp_out[0]
        return h + mlp_out

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(h_last)).float()

    def _sample_into(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Sample one token per sequence (batched); record token and logprob; retire finished.

        Exponential race (argmax of p / E with E ~ Exp(1)) draws from p exactly, and lets
        each row take its noise from its own request's generator while the arithmetic
        stays batched."""
        params = [s.request.params for s in seqs]
        temps = torch.tensor([p.temperature for p in params], dtype=torch.float32)[:, None]
        logp = torch.log_softmax(logits.cpu() / temps, dim=-1)
        probs = logp.exp()
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        if bool((top_p < 1.0).any()):
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop_sorted = sorted_p.cumsum(-1) - sorted_p >= top_p[:, None]
            probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted), 0.0)
        noise = torch.stack([torch.empty(probs.shape[1]).exponential_(generator=s.request.generator) for s in seqs])
        toks = (probs / noise).argmax(-1)
        lps = logp.gather(1, toks[:, None])[:, 0].tolist()
        finished = []
        for s, p, tok, lp in zip(seqs, params, toks.tolist(), lps):
            out = s.out
            if out.version_spans[-1][1] != self._version:
                out.version_spans.append((len(out.token_ids), self._version))
            out.token_ids.append(tok)
            out.logprobs.append(lp)
            s.last_token = tok
            if tok in p.stop_ids:
                out.finish_reason = "stop"
            elif len(out.token_ids) >= p.max_tokens or s.length + 1 >= self.max_seq_len:
                out.finish_reason = "length"
            if out.finish_reason:
                finished.append(s)
        self.decoded_tokens += len(seqs)
        for s in finished:
            self._release(s)
            req = s.request
            if all(x.out.finish_reason for x in req.seqs):
                self._retire_request(req)

    def _release(self, s: _Seq) -> None:
        """Free a sequence's slot, moving the last active sequence into it (compaction)."""
        if s.slot < 0:
            return
        j, last = s.slot, len(self.active) - 1
        if j != last:
            moved = self.active[last]
            n = moved.length
            for kc, vc in zip(self.k_cache, self.v_cache):
                kc[j, :, :n] = kc[last, :, :n]
                vc[j, :, :n] = vc[last, :, :n]
            moved.slot = j
            self.active[j] = moved
        self.active.pop()
        s.slot = -1

    def _retire_request(self, req: _Request) -> None:
        for s in req.seqs:
            self._release(s)
        self.requests.pop(req.request_id, None)
        if not req.future.done():
            req.future.set_result([s.out for s in req.seqs])

    def _fail(self, req: _Request, exc: Exception) -> None:
        for s in req.seqs:
            self._release(s)
        if req in self.waiting:
            self.waiting.remove(req)
        self.requests.pop(req.request_id, None)
        if not req.future.done():
            req.future.set_exception(exc)
