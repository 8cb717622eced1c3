"""Built-in torch engine: continuous batching over a slot KV cache of a transformers model.

How it runs: requests wait in a FIFO; a step loop (one asyncio task) admits waiting requests
into free cache slots between decode steps (one batched prefill for all admitted prompts,
each prompt's K/V copied into the slots of its ``n`` samples), then decodes one token for
every active slot in one batched forward (``decoder.SlotDecoder``), samples
(``sampler.sample``), and retires slots that sampled a stop id or reached ``max_tokens`` or
the cache length. A retired slot is refilled by moving the last active one into it, so the
batch shrinks as sequences finish and new requests take the freed slots at the next step.

Invariants:
- Logprobs: ``log_softmax(logits / T)`` of the sampled token, from the very logits tensor it
  was sampled from (before top-p; see ``base``), so they equal a teacher-forced forward pass
  at the same temperature.
- Reproducibility: a request's tokens are a function of (weights, prompt, params, seed);
  with ``seed=None`` the seed is ``mix64(sampling_seed, arrival index)``. Other requests in
  the batch do not change them (counter-based noise per sample, see ``sampler``).
- Steps are synchronous between awaits, so ``abort``, ``pause`` and weight loads never land
  inside a step. Weight loads require ``start_weight_update`` (which pauses) first; each
  completion records ``(first_token_index, version)`` whenever the live version changes.
- ``pause("keep")`` freezes sequences in their slots; ``resume`` continues them bit-exactly.
- ``update_weights_shm(..., adopt=True)`` (offered when ``adopts_shm``: CPU, the payload in
  the parameters' own dtypes) copies nothing: after the digests check out, the parameters
  become views into the payload (``SlotDecoder.adopt``), which the caller keeps held
  (``ShmWeightReader.hold``) while they are live. Any later copying load first gives the
  parameters private storage again (``SlotDecoder.privatize``).

Failure behaviour: a bad prompt (empty, longer than the cache, ids outside the vocabulary)
or ``n > max_batch`` fails that ``generate`` call with ``ValueError``; an exception in a
prefill fails the requests being admitted, one in a decode step fails the requests in the
batch; the loop keeps serving. A refused weight update (``ManifestMismatch``,
``DigestMismatch``, transfer error) changes no parameter; a cancelled ``generate`` aborts
its request.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from schemas.messages import WeightManifest
from stages.model import build_model
from stages.publisher.manifest import check_compatible, load_into
from stages.rollout.engines import transfer
from stages.rollout.engines.base import Completion, Engine, PauseMode, SamplingParams
from stages.rollout.engines.decoder import SlotDecoder
from stages.rollout.engines.sampler import mix64, sample

MAX_SEQ_LEN = 512
"""Cache length per slot (prompt + completion). The built-in tasks use < 32 tokens; a
qwen3-0.6b cache of 64 x 512 in bf16 is 1.9 GB."""


@dataclass
class _Seq:
    request: "_Request"
    index: int
    key: int
    """Noise key of this sample (``mix64(request seed, index)``)."""
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
    future: asyncio.Future
    seqs: list[_Seq] = field(default_factory=list)


class TorchEngine(Engine):
    def __init__(self, model: str | torch.nn.Module = "tiny", *, device: str = "cpu", dtype: str | torch.dtype = "float32",
                 max_batch: int = 64, seed: int = 0, sampling_seed: int = 0, max_seq_len: int = MAX_SEQ_LEN) -> None:
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if isinstance(model, str):
            model = build_model(model, dtype=self.dtype, device=self.device, seed=seed)
        self.model = model.eval().requires_grad_(False)
        self.decoder = SlotDecoder(self.model, max_batch, max_seq_len)
        self.device = self.decoder.device
        self.vocab = self.decoder.vocab
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.active: list[_Seq] = []
        """Invariant: ``active[i].slot == i`` (packed at the front of the cache)."""
        self.waiting: list[_Request] = []
        self.requests: dict[str, _Request] = {}
        self._version = 0
        self._updating: int | None = None
        """Version being loaded between ``start_weight_update`` and its finish/abort."""
        self._sampling_seed = sampling_seed
        self._arrivals = itertools.count()
        self._wake = asyncio.Event()
        self._running = asyncio.Event()
        self._running.set()
        self._admitting = True
        self._idle = asyncio.Event()
        self._idle.set()
        self._step_lock = asyncio.Lock()
        self.adopted = False
        """The parameters are views into an adopted shm payload (read-only memory)."""
        self._loop_task: asyncio.Task | None = None
        self.decoded_tokens = 0
        """Tokens sampled since construction (for throughput reports)."""

    # ------------------------------------------------------------------ requests
    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        await self.abort(list(self.requests))
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None

    async def generate(self, request_id: str, prompt_ids: np.ndarray | Sequence[int],
                       params: SamplingParams) -> list[Completion]:
        prompt = torch.as_tensor(np.asarray(prompt_ids, dtype=np.int64)).reshape(-1)
        if prompt.numel() == 0 or prompt.numel() >= self.max_seq_len:
            raise ValueError(f"{request_id}: prompt of {prompt.numel()} tokens (need 1..{self.max_seq_len - 1})")
        if int(prompt.max()) >= self.vocab or int(prompt.min()) < 0:
            raise ValueError(f"{request_id}: token id outside the vocabulary of {self.vocab}")
        if params.n > self.max_batch:
            raise ValueError(f"{request_id}: n={params.n} > max_batch={self.max_batch}")
        if request_id in self.requests:
            raise ValueError(f"{request_id}: a request with this id is already in flight")
        await self.start()
        seed = params.seed if params.seed is not None else mix64(self._sampling_seed, next(self._arrivals))
        req = _Request(request_id, prompt, params, asyncio.get_running_loop().create_future())
        req.seqs = [_Seq(req, i, mix64(seed, i)) for i in range(params.n)]
        self.requests[request_id] = req
        self.waiting.append(req)
        self._wake.set()
        try:
            return await asyncio.shield(req.future)
        except asyncio.CancelledError:
            self._abort_now(req)
            raise

    async def abort(self, request_id: str | Iterable[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            req = self.requests.get(rid)
            if req is not None:
                self._abort_now(req)

    def _abort_now(self, req: _Request) -> None:
        if req in self.waiting:
            self.waiting.remove(req)
        for s in req.seqs:
            if not s.out.finish_reason:
                s.out.finish_reason = "abort"
        self._retire_request(req)

    async def pause(self, mode: PauseMode = "keep") -> None:
        if mode == "wait":
            self._admitting = False
            await self._idle.wait()
        elif mode not in ("keep", "abort"):
            raise ValueError(f"pause mode {mode!r}: expected keep, abort or wait")
        self._running.clear()
        async with self._step_lock:  # the step in progress (if any) has finished
            if mode == "abort":
                await self.abort(list(self.requests))

    async def resume(self) -> None:
        self._admitting = True
        self._running.set()
        self._wake.set()

    # ------------------------------------------------------------------ weights
    def _params(self) -> dict[str, torch.Tensor]:
        return self.decoder.params  # built once (SlotDecoder.params); an update asks four times

    def _check_updating(self, manifest: WeightManifest) -> None:
        if self._updating is None:
            raise RuntimeError("update_weights_* called without start_weight_update")
        if manifest.version != self._updating:
            raise ValueError(f"manifest is version {manifest.version}, the update in progress is {self._updating}")
        check_compatible(manifest, self._params())

    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.adopted:  # never write into the read-only payload the parameters view
            self.decoder.privatize()
            self.adopted = False
        # copy_ moves across devices and casts dtype one tensor at a time (no second model copy).
        load_into(self.model, tensors)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    async def init_weight_transfer(self, backend: str, init_info: Mapping[str, Any]) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError("this process already has a default process group: pass a group to update_weights_nccl")
        url = f"tcp://{init_info['master_address']}:{init_info['master_port']}"
        await asyncio.to_thread(dist.init_process_group, backend, init_method=url,
                                rank=int(init_info["rank"]), world_size=int(init_info["world_size"]))

    async def start_weight_update(self, version: int, manifest: WeightManifest) -> None:
        if manifest.version != version:
            raise ValueError(f"start_weight_update({version}) with a manifest of version {manifest.version}")
        check_compatible(manifest, self._params())
        await self.pause("keep")
        self._updating = version

    def adopts_shm(self, manifest: WeightManifest) -> bool:
        """Whether ``update_weights_shm(..., adopt=True)`` can take ``manifest``'s payload as
        the parameters themselves: a CPU engine, every tensor in its parameter's dtype."""
        if self.device.type != "cpu":
            return False
        params = self._params()
        return all(e.name in params and str(params[e.name].dtype) == f"torch.{e.dtype}" for e in manifest.entries)

    async def update_weights_shm(self, buffer: memoryview | np.ndarray, manifest: WeightManifest,
                                 adopt: bool = False) -> list[str]:
        """Verify, then copy the payload in; or with ``adopt`` (see ``adopts_shm``) make the
        parameters views of it: ``buffer`` must then stay valid and unchanged while this
        version is live (the caller holds the slot)."""
        self._check_updating(manifest)
        tensors, digests = transfer.receive_shm(buffer, manifest)
        if adopt:
            if not self.adopts_shm(manifest):
                raise ValueError(f"version {manifest.version}: this engine cannot adopt the payload "
                                 f"(device {self.device}, dtypes of the manifest differ from its parameters')")
            self.decoder.adopt(tensors)
            self.adopted = True
        else:
            self._load(tensors)
        return digests

    async def update_weights_ipc(self, handles: Sequence[Any], manifest: WeightManifest) -> list[str]:
        """``handles``: ``reduce_tensor`` tuples or ``vllm_worker.IpcBucketHandle``s (plain fields)."""
        self._check_updating(manifest)
        tensors, digests = transfer.receive_ipc(handles, manifest)
        self._load(tensors)
        return digests

    async def update_weights_nccl(self, group: Any, manifest: WeightManifest, src: int = 0) -> list[str]:
        """``group``: a ``stages.publisher.collective.BroadcastGroup`` (the weight group), a
        ``torch.distributed`` group, or ``None`` (the group of ``init_weight_transfer``)."""
        import torch.distributed as dist

        self._check_updating(manifest)
        if group is None and not dist.is_initialized():
            raise RuntimeError("update_weights_nccl without a group: call init_weight_transfer first")
        # Blocking collective in a thread: the event loop (heartbeats, aborts) stays live.
        tensors, digests = await asyncio.to_thread(transfer.receive_collective, group, manifest, src, self.device)
        self._load(tensors)
        return digests

    async def teacher_forced_logprobs(self, token_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64), device=self.device).reshape(1, -1)
        if ids.numel() < 2 or int(ids.max()) >= self.vocab or int(ids.min()) < 0:
            raise ValueError(f"canary of {ids.numel()} tokens: need >= 2 ids inside the vocabulary of {self.vocab}")
        async with self._step_lock:  # between decode steps; the slot cache is not touched
            with torch.inference_mode():
                logits = self.model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        return lp.cpu().numpy().astype(np.float32)

    async def finish_weight_update(self, version: int) -> None:
        if self._updating is not None and version != self._updating:
            raise ValueError(f"finish_weight_update({version}) while version {self._updating} is loading")
        self._version = version
        self._updating = None
        await self.resume()

    async def abort_weight_update(self) -> None:
        self._updating = None
        await self.resume()

    # ------------------------------------------------------------------ step loop
    async def _loop(self) -> None:
        while True:
            if not (self.active or (self.waiting and self._admitting)) or not self._running.is_set():
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._step_lock:
                if self._running.is_set():
                    if self._admitting:
                        self._admit()
                    if self.active:
                        self._decode()
            await asyncio.sleep(0)  # let new requests, aborts and weight updates in

    def _admit(self) -> None:
        batch = []
        free = self.max_batch - len(self.active)
        while self.waiting and free >= self.waiting[0].params.n:
            req = self.waiting.pop(0)
            free -= req.params.n
            batch.append(req)
        if not batch:
            return
        try:
            first = len(self.active)
            owners = [i for i, r in enumerate(batch) for _ in r.seqs]
            logits = self.decoder.prefill([r.prompt for r in batch], list(range(first, first + len(owners))), owners)
        except Exception as e:  # noqa: BLE001 - reported to the callers of these requests
            for r in batch:
                self._fail(r, e)
            return
        seqs = []
        for r in batch:
            for s in r.seqs:
                s.slot, s.length = first + len(seqs), r.prompt.numel()
                s.out.version_spans.append((0, self._version))
                self.active.append(s)
                seqs.append(s)
        self._idle.clear()
        self._sample_into(seqs, logits[torch.tensor(owners, device=logits.device)])

    def _decode(self) -> None:
        seqs = list(self.active)
        try:
            logits = self.decoder.decode([s.last_token for s in seqs], [s.length for s in seqs])
        except Exception as e:  # noqa: BLE001 - reported to the callers of these requests
            for req in {s.request.request_id: s.request for s in seqs}.values():
                self._fail(req, e)
            return
        for s in seqs:
            s.length += 1
        self._sample_into(seqs, logits)

    def _sample_into(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Sample one token per sequence (batched); record token, logprob, span; retire."""
        params = [s.request.params for s in seqs]
        dev = logits.device
        tokens, logprobs = sample(
            logits,
            torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev),
            torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev),
            torch.tensor([s.key for s in seqs], dtype=torch.int64, device=dev),
            torch.tensor([len(s.out.token_ids) for s in seqs], dtype=torch.int64, device=dev),
            any(p.top_p < 1.0 for p in params),
        )
        finished = []
        for s, p, tok, lp in zip(seqs, params, tokens.tolist(), logprobs.tolist()):
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
        if finished:
            self._release(finished)
            done = {id(s.request): s.request for s in finished}
            for req in done.values():
                if all(x.out.finish_reason for x in req.seqs):
                    self._retire_request(req)

    def _release(self, gone: list[_Seq]) -> None:
        """Free the slots of ``gone`` and keep the active slots packed: each hole below the
        new end takes one of the surviving sequences above it, all moved in one gather per
        cache tensor (a group's samples usually finish in the same step: one gather, not
        one slot move per sample)."""
        gone = [s for s in gone if s.slot >= 0]
        if not gone:
            return
        for s in gone:
            self.active[s.slot] = None  # type: ignore[call-overload]
        end = len(self.active) - len(gone)
        holes = sorted(s.slot for s in gone if s.slot < end)
        movers = [m for m in self.active[end:] if m is not None]
        if holes:
            self.decoder.move_slots([m.slot for m in movers], holes, max(m.length for m in movers))
            for h, m in zip(holes, movers):
                m.slot = h
                self.active[h] = m
        del self.active[end:]
        for s in gone:
            s.slot = -1
        if not self.active:
            self._idle.set()

    def _retire_request(self, req: _Request) -> None:
        self._release(req.seqs)
        self.requests.pop(req.request_id, None)
        if not req.future.done():
            req.future.set_result([s.out for s in req.seqs])

    def _fail(self, req: _Request, exc: Exception) -> None:
        self._release(req.seqs)
        if req in self.waiting:
            self.waiting.remove(req)
        self.requests.pop(req.request_id, None)
        if not req.future.done():
            req.future.set_exception(exc)
