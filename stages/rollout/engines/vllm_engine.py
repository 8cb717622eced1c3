"""vLLM engine: the ``Engine`` interface over vLLM 0.26.0's ``AsyncLLM`` (GPU only).

What it maps to (see ``base`` for the interface's contract):
- ``generate``: ``AsyncLLM.add_request`` of a ``TokensPrompt`` with ``n`` samples,
  ``logprobs=0`` (the sampled token's logprob only) and ``output_kind=DELTA``; the engine is
  built with ``logprobs_mode="processed_logprobs"`` so a logprob is ``log_softmax(logits / T)``
  of the sampled token (greedy: ``log_softmax(logits)``), what the learner's teacher-forced
  pass computes. ``ignore_eos=True``: only ``params.stop_ids`` end a completion (the stop id is
  kept, with its logprob), as in the torch engine. No tokenizer is loaded.
- ``abort`` / ``pause(mode)`` / ``resume``: ``AsyncLLM.abort`` and the engine core's
  ``pause_scheduler(mode, clear_cache)`` / ``resume_scheduler``.
- Weight updates: ``start_weight_update`` checks the manifest against the model's tensors
  (``ManifestMismatch`` names every offender; nothing changes) and pauses with
  ``mode="keep"``; ``update_weights_ipc/nccl/shm`` hand the buckets to
  ``vllm_worker.ConveyorWorkerExtension`` through ``collective_rpc`` (plain fields, never
  pickle) and return its per-bucket ``g1:`` digests (shm: the BLAKE2b digests verified on
  the host); ``finish_weight_update(v)`` makes ``v`` live and resumes.

Per-request weight versions: every token is attributed to the version that was live when it
was sampled. After the pause completes, all outputs the engine core produced under the old
version are already in the client's output queue (one ordered socket); a marker put behind
them is consumed only once the output handler processed them, and then each request's
pending delta is absorbed at once. So the version switch in ``finish_weight_update`` cannot
re-label old tokens, and nothing is sampled between ``start`` and ``finish``.

KV cache across an update (``kv_on_update``): ``"keep"`` (default) keeps the cache of
in-flight sequences, so their earlier positions keep keys/values computed by the old
weights, exactly as the torch engine does; ``"recompute"`` preempts them at the pause and
vLLM recomputes their prefixes with the new weights on resume. Prefix caching is off by
default, so a new request never reuses blocks computed under an older version.

Start-up: building the engine blocks for its start (weights, memory profiling, CUDA graph
capture unless ``enforce_eager``). ``VLLM_USE_FLASHINFER_SAMPLER=0`` is set unless the
caller set it: with it on, vLLM JIT-compiles FlashInfer's sampling kernels at every fresh
start (~100 s on the GPU machine, whose compile cache does not survive), the ~120 s pause
seen at engine start; PyTorch's sampler is used instead (``docs/performance.md``). Built-in
shapes get a temporary directory holding ``config.json`` and ``load_format="dummy"``; with
``init="seeded"`` the engine then loads ``build_model(name, seed)``'s weights through the
same CUDA IPC path before serving, so version 0 equals the torch engine's and the learner's
initial weights.

Failure behaviour: a bad prompt raises ``ValueError`` for that call only; a cancelled
``generate`` aborts its request; weight calls out of order raise ``RuntimeError``; a refused
update (``ManifestMismatch``, ``DigestMismatch``, bad handles) leaves the old weights, and
the caller ends it with ``abort_weight_update`` (which resumes). vLLM itself must be
importable only when ``start`` runs: this module imports on machines without it.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np
import torch

from schemas.messages import WeightManifest
from stages.model import BUILTIN_SHAPES, build_model, model_config
from stages.publisher.manifest import check_compatible, unpack
from stages.publisher.senders import CudaBuckets  # noqa: F401 - moved there (the cuda_ipc sender); re-exported
from stages.rollout.engines.base import Completion, Engine, PauseMode, SamplingParams
from stages.rollout.engines.vllm_worker import IpcBucketHandle, NcclRendezvous, encode_ipc_handle

WORKER_EXTENSION = "stages.rollout.engines.vllm_worker.ConveyorWorkerExtension"
DRAIN_TIMEOUT_S = 5.0
"""Upper bound on waiting for the output handler to deliver pre-pause outputs; it normally
takes one event-loop pass (the outputs are already in this process when the pause returns)."""
DEFAULT_GPU_MEMORY_UTILIZATION = 0.5
"""Half the GPU for vLLM (weights + KV cache): leaves the other half to a colocated learner and
to weight-update staging."""
DEFAULT_MAX_MODEL_LEN = 4096
"""Prompt + completion cap; the built-in shapes allow 40960, but RL rollouts here are short and
a smaller cap keeps the memory profile and CUDA graph capture small."""

KvPolicy = Literal["keep", "recompute"]


@dataclass
class _Request:
    request_id: str
    completions: list[Completion]
    submitted_version: int
    collector: Any = None
    finished: bool = False


def write_model_dir(name: str, dtype: str) -> str:
    """A directory with the ``config.json`` of a built-in shape (vLLM reads the config from disk)."""
    cfg = model_config(name)
    import transformers

    arch = transformers.AutoModelForCausalLM._model_mapping[type(cfg)].__name__
    d = cfg.to_dict()
    d.update(architectures=[arch], torch_dtype=dtype, dtype=dtype)
    path = Path(tempfile.mkdtemp(prefix=f"conveyor-vllm-{name}-"))
    (path / "config.json").write_text(json.dumps(d, indent=1))
    return str(path)


def pin_cuda_device(device: str) -> None:
    """Make ``cuda:N`` the only GPU this process (and vLLM's engine core, spawned from it)
    sees, by narrowing ``CUDA_VISIBLE_DEVICES``; ``cuda`` / ``cuda:0`` with nothing set leaves
    everything as is. Must run before CUDA is initialised in this process (``ValueError``
    otherwise, and for a device index the current visibility does not have)."""
    if not device.startswith("cuda"):
        raise ValueError(f"rollout.device={device!r}: the vllm engine needs a cuda device")
    index = int(device.partition(":")[2] or 0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None and index == 0:
        return
    if torch.cuda.is_initialized():
        raise ValueError(f"rollout.device={device!r}: CUDA is already initialised in this process")
    ids = visible.split(",") if visible is not None else [str(i) for i in range(index + 1)]
    if index >= len(ids):
        raise ValueError(f"rollout.device={device!r}: CUDA_VISIBLE_DEVICES={visible!r} has no device {index}")
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[index]


class VllmEngine(Engine):
    def __init__(self, model: str = "qwen3-0.6b", *, dtype: str = "bfloat16", seed: int = 0,
                 init: Literal["seeded", "dummy"] = "seeded",
                 gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
                 max_model_len: int = DEFAULT_MAX_MODEL_LEN, max_num_seqs: int = 256,
                 enforce_eager: bool = False, kv_on_update: KvPolicy = "keep", digests: bool = True,
                 engine_kwargs: dict | None = None) -> None:
        if kv_on_update not in ("keep", "recompute"):
            raise ValueError(f"kv_on_update={kv_on_update!r}: expected keep or recompute")
        if init not in ("seeded", "dummy"):
            raise ValueError(f"init={init!r}: expected seeded or dummy")
        self.model_name, self.dtype, self.seed, self.init = model, dtype, seed, init
        self.builtin = model in BUILTIN_SHAPES
        if not self.builtin and not os.path.isdir(model):
            raise ValueError(f"model {model!r}: not a built-in shape ({', '.join(BUILTIN_SHAPES)}) nor a local directory")
        self.vocab = int(model_config(model).vocab_size)
        self.max_model_len = max_model_len
        self.kv_on_update = kv_on_update
        self.digests = digests
        self.engine_args = dict(
            skip_tokenizer_init=True, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, max_num_seqs=max_num_seqs, enforce_eager=enforce_eager,
            enable_prefix_caching=False, logprobs_mode="processed_logprobs", disable_log_stats=True,
            worker_extension_cls=WORKER_EXTENSION, **(engine_kwargs or {}))
        self.llm = None
        self.describe: dict = {}
        self.start_seconds = 0.0
        """Wall time of the last ``start`` (engine build + seeded weights)."""
        self._model_dir: str | None = None
        self._version = 0
        self._updating: int | None = None
        self._paused = False
        self._requests: dict[str, _Request] = {}
        self._start_lock = asyncio.Lock()
        self._starting: asyncio.Task | None = None  # the task inside ``start``, while it runs
        self._ready = False  # built and (seeded) loaded
        self._nccl: NcclRendezvous | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def paused(self) -> bool:
        return self._paused

    async def start(self) -> None:
        """Build the engine (and, ``init="seeded"``, load ``build_model``'s weights) once;
        every other entry point awaits it first. The seeded load goes through this engine's
        own update path (``start_weight_update`` ... ``finish_weight_update``), which awaits
        ``start`` again from inside it: that re-entry by the starting task returns at once
        (an ``asyncio.Lock`` is not re-entrant: it deadlocked the seeded start on the GPU,
        where the vLLM tests then hung), while any other task waits for the whole start."""
        if self._ready or self._starting is asyncio.current_task():
            return
        async with self._start_lock:
            if self._ready:
                return
            self._starting = asyncio.current_task()
            try:
                await self._start()
            finally:
                self._starting = None

    async def _start(self) -> None:
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.perf_counter()
        if self.builtin:
            self._model_dir = write_model_dir(self.model_name, self.dtype)
            args = AsyncEngineArgs(model=self._model_dir, load_format="dummy", **self.engine_args)
        else:
            args = AsyncEngineArgs(model=self.model_name, **self.engine_args)
        # Off the event loop: a start takes 15-80 s (more with torch.compile and CUDA
        # graphs on a cold cache), during which the stage must keep sending heartbeats.
        # AsyncLLM supports being built outside a running loop (its output tasks start
        # lazily at the first request or RPC).
        try:
            self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except ValueError as e:  # e.g. a signal handler that only the main thread may set
            if "main thread" not in str(e):
                raise
            self.llm = AsyncLLM.from_engine_args(args)
        try:
            self.describe = (await self.llm.collective_rpc("conveyor_describe"))[0]
            if self.builtin and self.init == "seeded":
                # Off the loop as well: building the model (CPU init, then a copy to the
                # GPU) takes seconds for 1.7B, and a loop held that long sends no heartbeat.
                model = await asyncio.to_thread(build_model, self.model_name, dtype=getattr(torch, self.dtype),
                                                device="cuda", seed=self.seed)
                await self._load_local(model, version=0)
                del model
        except BaseException:
            # A half-started engine (dummy weights live) must not serve: the next start
            # builds it again.
            self.llm.shutdown()
            self.llm = None
            raise
        self._ready = True
        self.start_seconds = time.perf_counter() - t0

    async def _load_local(self, model: torch.nn.Module, version: int) -> None:
        """Load a model held by this process through the CUDA IPC path (the seeded start)."""
        state = dict(model.named_parameters())
        # Bucket allocation and the first fill (which compiles the fused g1 digest, seconds
        # on a cold cache) run in a worker thread, so the loop keeps its heartbeats.
        buckets = await asyncio.to_thread(CudaBuckets, state)
        manifest = await asyncio.to_thread(buckets.fill, state, version)
        await self.start_weight_update(version, manifest)
        try:
            await self.update_weights_ipc(buckets.handles(), manifest)
        except BaseException:
            await self.abort_weight_update()
            raise
        await self.finish_weight_update(version)
        await self.llm.collective_rpc("conveyor_release_ipc")
        del buckets, state, model
        torch.cuda.empty_cache()

    async def stop(self) -> None:
        if self.llm is None:
            return
        await self.abort(list(self._requests))
        self.llm.shutdown()
        self.llm = None
        self._ready = False

    # ------------------------------------------------------------------ requests
    def _sampling_params(self, p: SamplingParams):
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        return VSP(n=p.n, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens,
                   stop_token_ids=list(p.stop_ids), ignore_eos=True, seed=p.seed, logprobs=0,
                   detokenize=False, skip_special_tokens=False, output_kind=RequestOutputKind.DELTA)

    async def generate(self, request_id: str, prompt_ids: np.ndarray | Sequence[int],
                       params: SamplingParams) -> list[Completion]:
        prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if prompt.size == 0 or prompt.size >= self.max_model_len:
            raise ValueError(f"{request_id}: prompt of {prompt.size} tokens (need 1..{self.max_model_len - 1})")
        if int(prompt.max()) >= self.vocab or int(prompt.min()) < 0:
            raise ValueError(f"{request_id}: token id outside the vocabulary of {self.vocab}")
        if request_id in self._requests:
            raise ValueError(f"{request_id}: a request with this id is already in flight")
        await self.start()
        from vllm.inputs import TokensPrompt

        req = _Request(request_id, [Completion() for _ in range(params.n)], self._version)
        self._requests[request_id] = req
        try:
            req.collector = await self.llm.add_request(
                request_id, TokensPrompt(prompt_token_ids=prompt.tolist()), self._sampling_params(params))
            while not req.finished:
                out = req.collector.get_nowait() or await req.collector.get()
                self._absorb(req, out)
        except asyncio.CancelledError:
            await asyncio.shield(self.llm.abort(request_id))
            raise
        finally:
            self._requests.pop(request_id, None)
            if req.collector is not None:
                req.collector.close()
        for c in req.completions:
            if not c.version_spans:
                c.version_spans = [(0, req.submitted_version)]
            if not c.finish_reason:
                c.finish_reason = "abort"
        return req.completions

    def _absorb(self, req: _Request, out) -> None:
        v = self._version
        for co in out.outputs:
            c = req.completions[co.index]
            toks = list(co.token_ids)
            if toks:
                n0 = len(c.token_ids)
                if not c.version_spans or c.version_spans[-1][1] != v:
                    if c.version_spans and c.version_spans[-1][0] == n0:
                        c.version_spans[-1] = (n0, v)
                    else:
                        c.version_spans.append((n0, v))
                lps = co.logprobs or []
                if len(lps) != len(toks):
                    raise RuntimeError(f"{req.request_id}: {len(toks)} tokens but {len(lps)} logprobs from vLLM")
                c.token_ids.extend(toks)
                c.logprobs.extend(float(d[t].logprob) for t, d in zip(toks, lps))
            if co.finish_reason:
                c.finish_reason = str(co.finish_reason)
        req.finished = bool(out.finished)

    async def teacher_forced_logprobs(self, token_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """The canary (``Engine.teacher_forced_logprobs``) through vLLM's prompt logprobs: one
        request of ``token_ids`` with ``prompt_logprobs=0`` (the logprob of each prompt token
        itself, from the model's raw output, i.e. temperature 1) and one generated token that
        is thrown away. It runs like any request, between the engine's steps."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size < 2 or int(ids.max()) >= self.vocab or int(ids.min()) < 0:
            raise ValueError(f"canary of {ids.size} tokens: need >= 2 ids inside the vocabulary of {self.vocab}")
        await self.start()
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        params = VSP(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        final = None
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=ids.tolist()), params,
                                           f"canary-{uuid.uuid4().hex}"):
            final = out
        plp = final.prompt_logprobs if final is not None else None
        if not plp or len(plp) != ids.size:
            raise RuntimeError(f"canary: vLLM returned {0 if not plp else len(plp)} prompt logprobs for {ids.size} ids")
        return np.asarray([plp[t][int(ids[t])].logprob for t in range(1, ids.size)], dtype=np.float32)

    async def abort(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        if ids and self.llm is not None:
            await self.llm.abort(ids)

    async def pause(self, mode: PauseMode = "keep") -> None:
        if mode not in ("keep", "abort", "wait"):
            raise ValueError(f"pause mode {mode!r}: expected keep, abort or wait")
        await self.start()
        clear = mode == "keep" and self.kv_on_update == "recompute" and self._updating is not None
        core = self.llm.engine_core
        if hasattr(core, "pause_scheduler_async"):
            # Straight to the engine core: AsyncLLM.pause_generation adds a fixed 20 ms sleep
            # for output ordering, which ``_drain`` does exactly instead.
            await core.pause_scheduler_async(mode=mode, clear_cache=clear)
        else:
            await self.llm.pause_generation(mode=mode, clear_cache=clear)
        self._paused = True
        await self._drain()

    async def _drain(self) -> None:
        """Deliver every output produced before the pause to its request (see module doc).

        Nothing to wait for when no request is unfinished, or when AsyncLLM's output handler
        (the queue's only consumer; it starts with the first request, and the engine is built
        off the event loop, so an engine that has not generated yet has none) is not running:
        waiting on the queue then always ran into ``DRAIN_TIMEOUT_S`` (an idle engine's update
        took 5.03 s on the H200, 5.00 s of it this wait; the seeded start paid it too)."""
        if not any(r.collector is not None and not r.finished for r in self._requests.values()):
            return
        queue = getattr(self.llm.engine_core, "outputs_queue", None)
        handler = getattr(self.llm, "output_handler", None)
        if isinstance(queue, asyncio.Queue) and handler is not None and not handler.done():
            from vllm.v1.engine import EngineCoreOutputs

            queue.put_nowait(EngineCoreOutputs())
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while not queue.empty() and time.monotonic() < deadline:
                await asyncio.sleep(0)
        else:  # in-process engine core: outputs are handed over synchronously
            await asyncio.sleep(0)
        for req in list(self._requests.values()):
            if req.collector is not None and not req.finished:
                out = req.collector.get_nowait()
                if out is not None:
                    self._absorb(req, out)

    async def resume(self) -> None:
        if self.llm is None:
            return
        core = self.llm.engine_core
        if hasattr(core, "resume_scheduler_async"):
            await core.resume_scheduler_async()
        else:
            await self.llm.resume_generation()
        self._paused = False

    # ------------------------------------------------------------------ weights
    def _expected(self, manifest: WeightManifest) -> dict[str, torch.Tensor]:
        """The model's checkpoint tensors as meta tensors (names, shapes, dtypes)."""
        names = {e.name for e in manifest.entries}
        return {n: torch.empty(shape, dtype=getattr(torch, dt), device="meta")
                for n, shape, dt, alias in self.describe["params"] if not alias or n in names}

    def _check_updating(self, manifest: WeightManifest) -> bytes:
        if self._updating is None:
            raise RuntimeError("update_weights_* called without start_weight_update")
        if manifest.version != self._updating:
            raise ValueError(f"manifest is version {manifest.version}, the update in progress is {self._updating}")
        return msgspec.msgpack.encode(manifest)

    async def start_weight_update(self, version: int, manifest: WeightManifest) -> None:
        if manifest.version != version:
            raise ValueError(f"start_weight_update({version}) with a manifest of version {manifest.version}")
        await self.start()
        if self.describe.get("fast"):
            check_compatible(manifest, self._expected(manifest))
        self._updating = version
        await self.pause("keep")

    async def update_weights_ipc(self, handles: Sequence[tuple[Any, tuple] | IpcBucketHandle],
                                 manifest: WeightManifest, *, via_vllm_loader: bool = False) -> list[str]:
        """``handles``: ``reduce_tensor`` tuples or ``IpcBucketHandle``s, one per bucket.
        ``via_vllm_loader``: use vLLM's own loader instead of the copy plan (benchmarks)."""
        msg = self._check_updating(manifest)
        plain = msgspec.msgpack.encode([encode_ipc_handle(h) for h in handles])
        return (await self.llm.collective_rpc("conveyor_load_ipc",
                                              args=(msg, plain, self.digests, True, via_vllm_loader)))[0]

    async def init_nccl(self, rendezvous: NcclRendezvous) -> None:
        """Join the sender's broadcast group; the sender runs ``vllm_worker.open_nccl_sender``
        at the same time. Blocks the engine core until every rank joined."""
        await self.start()
        await self.llm.collective_rpc("conveyor_nccl_init", args=(msgspec.msgpack.encode(rendezvous),))
        self._nccl = rendezvous

    async def update_weights_nccl(self, group: NcclRendezvous, manifest: WeightManifest, src: int = 0) -> list[str]:
        """``group``: the rendezvous of the broadcast group (joined first if new). The sender
        broadcasts each bucket (``vllm_worker.broadcast_buckets``) while this call runs."""
        msg = self._check_updating(manifest)
        if self._nccl != group:
            await self.init_nccl(group)
        return (await self.llm.collective_rpc("conveyor_load_nccl", args=(msg, src, self.digests)))[0]

    async def update_weights_shm(self, buffer: memoryview | np.ndarray, manifest: WeightManifest) -> list[str]:
        """Host path: BLAKE2b digests verified here first, then the buckets travel to the worker
        through vLLM's RPC (a copy of the whole payload: the CPU fallback, not the fast path)."""
        msg = self._check_updating(manifest)
        payload = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=np.uint8)
        payload = payload.reshape(-1).view(np.uint8)
        if payload.nbytes < manifest.total_bytes:
            raise ValueError(f"version {manifest.version}: buffer of {payload.nbytes} bytes, "
                             f"manifest needs {manifest.total_bytes}")
        _, digests = unpack(manifest, payload)  # DigestMismatch before anything moves
        arrays = [payload[b.offset : b.offset + b.nbytes] for b in manifest.buckets]
        await self.llm.collective_rpc("conveyor_load_host", args=(msg, arrays, False))
        return digests

    async def finish_weight_update(self, version: int) -> None:
        if self._updating is not None and version != self._updating:
            raise ValueError(f"finish_weight_update({version}) while version {self._updating} is loading")
        await self.llm.collective_rpc("conveyor_finish", args=(version,))
        self._version = version
        self._updating = None
        await self.resume()

    async def abort_weight_update(self) -> None:
        self._updating = None
        await self.resume()

    async def param_digests(self, manifest: WeightManifest) -> list[str]:
        """``g1:`` digests of the live parameters in ``manifest``'s layout (tests, canaries)."""
        return (await self.llm.collective_rpc("conveyor_param_digests", args=(msgspec.msgpack.encode(manifest),)))[0]

    async def last_load_seconds(self) -> float:
        return float((await self.llm.collective_rpc("conveyor_last_load_s"))[0])
