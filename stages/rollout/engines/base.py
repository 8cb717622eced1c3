"""The engine interface: what the rollout stage needs from an inference engine.

Two implementations: ``TorchEngine`` (built in, CPU or GPU) and a vLLM engine (GPU). The
shape follows vLLM 0.26.0's ``AsyncLLM`` so that the vLLM engine is a thin adapter:

=================================  ==========================================================
this interface                     vLLM ``AsyncLLM``
=================================  ==========================================================
``generate(id, prompt_ids, p)``    ``generate(TokensPrompt(prompt_token_ids=...), sp, id)``
                                   with ``output_kind=FINAL_ONLY``; ``n`` children collected
``abort(id | ids)``                ``abort(id | ids)``
``pause(mode)`` / ``resume()``     ``pause_generation(mode="keep"|"abort"|"wait")`` /
                                   ``resume_generation()`` (vLLM defaults to ``abort``, we
                                   to ``keep``: pass the mode explicitly)
``init_weight_transfer(b, info)``  ``init_weight_transfer_engine(WeightTransferInitRequest)``
``start_weight_update(v, man)``    ``start_weight_update()`` (``v``/``man`` checked locally)
``update_weights_ipc/nccl(...)``   ``update_weights(WeightTransferUpdateRequest)`` whose
                                   ``update_info`` is ``names``/``dtype_names``/``shapes`` from
                                   the manifest plus the handles (ipc) or nothing (nccl)
``update_weights_shm(buf, man)``   ``collective_rpc`` into a worker extension that copies
                                   the same manifest out of the shared buffer
``finish_weight_update(v)``        ``finish_weight_update(weight_version=str(v))``
=================================  ==========================================================

Invariants every engine keeps:
- ``generate`` returns exactly ``params.n`` completions; each has one logprob per sampled
  token and ``version_spans`` rows ``(first_token_index, weight_version)``, first row at 0.
- Logprob semantics: ``log_softmax(logits / temperature)`` of the sampled token, before
  top-p truncation (vLLM: ``logprobs_mode="processed_logprobs"``, identical when
  ``top_p == 1``; with ``top_p < 1`` vLLM renormalises over the nucleus, so the vLLM
  adapter must either run with ``top_p == 1`` or recompute). This is what the learner's
  teacher-forced forward at the same temperature computes, so importance ratios compare
  like with like. ``temperature == 0`` means greedy; its logprob is ``log_softmax(logits)``.
- Weight updates land between decode steps: in-flight requests continue on the new
  weights and record a new span; nothing is dropped. A version goes live only after
  ``finish_weight_update``; an update refused before any byte is copied (manifest
  mismatch, bad digest, failed transfer) leaves the old weights.
- ``abort`` finishes a request's completions with ``finish_reason="abort"`` and the tokens
  produced so far; aborting an unknown or finished id is a no-op.

Failure behaviour: invalid ``SamplingParams`` raise ``ValueError`` when constructed; a
weight-update call out of order (``update_weights_*`` without ``start_weight_update``)
raises ``RuntimeError``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from schemas.messages import Sample, WeightManifest

PauseMode = Literal["keep", "abort", "wait"]
"""``keep``: freeze in-flight requests at the next step boundary, they continue on resume;
``abort``: finish every in-flight and waiting request with ``abort``; ``wait``: admit nothing
new and return once in-flight requests have finished."""

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily (vLLM's ``_SAMPLING_EPS``)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop_ids: tuple[int, ...] = ()
    """A sampled stop id ends the completion (it is included, with its logprob)."""
    n: int = 1
    seed: int | None = None
    """Per-request seed: the same request with the same seed samples the same tokens,
    whatever else is in the batch. ``None``: drawn from the engine's sampling seed."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", tuple(int(t) for t in self.stop_ids))
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: must be >= 1")
        if self.n < 1:
            raise ValueError(f"n={self.n}: must be >= 1")


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    version_spans: list[tuple[int, int]] = field(default_factory=list)
    finish_reason: str = ""
    """``stop``, ``length`` or ``abort`` once finished; empty while running."""
    routed_experts: np.ndarray | None = None
    """MoE engines that record routing: uint16 [T, moe_layers, top_k]."""

    def to_sample(self) -> Sample:
        spans = np.asarray(self.version_spans or [(0, -1)], dtype=np.int32).reshape(-1, 2)
        return Sample(np.asarray(self.token_ids, np.int32), np.asarray(self.logprobs, np.float32),
                      spans, self.finish_reason, self.routed_experts)


class Engine(abc.ABC):
    @property
    @abc.abstractmethod
    def weight_version(self) -> int:
        """The live version: the one that produced the tokens sampled now."""

    async def start(self) -> None:
        """Start background work (the step loop). Idempotent."""

    async def stop(self) -> None:
        """Abort everything in flight and stop background work."""

    @abc.abstractmethod
    async def generate(self, request_id: str, prompt_ids: np.ndarray | Sequence[int],
                       params: SamplingParams) -> list[Completion]:
        """``params.n`` completions of one token-id prompt; raises ``ValueError`` for a bad
        prompt (empty, too long, ids outside the vocabulary) without affecting others."""

    @abc.abstractmethod
    async def abort(self, request_id: str | Iterable[str]) -> None: ...

    @abc.abstractmethod
    async def pause(self, mode: PauseMode = "keep") -> None:
        """Hold generation at the next step boundary; returns once nothing runs."""

    @abc.abstractmethod
    async def resume(self) -> None: ...

    @property
    @abc.abstractmethod
    def paused(self) -> bool: ...

    async def init_weight_transfer(self, backend: str, init_info: Mapping[str, Any]) -> None:
        """Optional: join the sender's process group once, before ``update_weights_nccl``
        with no group: ``init_info`` holds ``master_address``, ``master_port``, ``rank`` (this
        engine's), ``world_size``; ``backend``: ``nccl`` (GPUs) or ``gloo`` (host). Engines
        that join through the ``group`` argument of ``update_weights_nccl`` keep this default."""
        raise RuntimeError(f"{type(self).__name__} joins weight-transfer groups through update_weights_nccl(group=...)")

    @abc.abstractmethod
    async def start_weight_update(self, version: int, manifest: WeightManifest) -> None:
        """Check the manifest against the model (``ManifestMismatch`` names every offender;
        nothing changes) and pause at the next step boundary."""

    @abc.abstractmethod
    async def update_weights_shm(self, buffer: memoryview | np.ndarray, manifest: WeightManifest) -> list[str]:
        """Load a whole payload (the manifest's layout) from host memory; verifies every
        bucket's digest before copying anything. Returns the bucket digests."""

    @abc.abstractmethod
    async def update_weights_ipc(self, handles: Sequence[Any], manifest: WeightManifest) -> list[str]:
        """Load from the sender's own buffers: one handle per manifest bucket, each a flat
        uint8 CUDA tensor of the bucket's bytes, as a ``vllm_worker.IpcBucketHandle`` (plain
        fields, what travels in a ``WeightsOffer``) or a ``torch.multiprocessing.reductions.
        reduce_tensor`` tuple ``(rebuild_fn, args)``. Verifies the manifest's digests before
        copying; returns the bucket digests computed on what was received."""

    @abc.abstractmethod
    async def update_weights_nccl(self, group: Any, manifest: WeightManifest, src: int = 0) -> list[str]:
        """Receive every bucket by broadcast from rank ``src`` over ``group`` (the torch engine:
        a ``stages.publisher.collective.BroadcastGroup``, a ``torch.distributed`` group, or
        ``None`` for the group joined by ``init_weight_transfer``; the vLLM engine: an
        ``NcclRendezvous``); the sender broadcasts flat uint8 buckets in manifest order.
        Verifies the manifest's digests before copying; returns the bucket digests."""

    async def teacher_forced_logprobs(self, token_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Optional (the publisher's canary): float32 [T-1], the logprob of ``token_ids[t+1]``
        given ``token_ids[:t+1]`` under the live weights, at temperature 1. Engines that
        cannot compute it raise ``NotImplementedError`` (the canary is then not reported)."""
        raise NotImplementedError(f"{type(self).__name__} has no teacher-forced logprobs")

    @abc.abstractmethod
    async def finish_weight_update(self, version: int) -> None:
        """Make ``version`` live and resume."""

    @abc.abstractmethod
    async def abort_weight_update(self) -> None:
        """Give up an update in progress (old weights stay if nothing was copied) and resume."""
