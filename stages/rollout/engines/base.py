"""The engine interface: what the rollout stage needs from an inference engine.

Two implementations: ``TorchEngine`` (built in, CPU or GPU) and ``VllmEngine`` (GPU). The
shape follows vLLM's ``AsyncLLM`` so the vLLM engine is a thin adapter: token-id prompts,
``n`` samples per request, ``abort(request_id)``, ``pause``/``resume`` between engine steps
(vLLM: ``pause_generation(mode="keep")`` / ``resume_generation``), and a three-phase weight
update (vLLM: ``start_weight_update`` / ``update_weights`` / ``finish_weight_update``
through ``collective_rpc`` on a worker extension).

Invariants every engine keeps:
- ``generate`` returns exactly ``params.n`` completions; each has one logprob per sampled
  token, taken from the distribution the token was sampled from (temperature applied,
  before top-p truncation — vLLM's ``logprobs_mode="processed_logits"`` minus top-p),
  and ``version_spans`` rows ``(first_token_index, weight_version)``.
- Weight updates land between decode steps: in-flight requests continue on the new
  weights and record a new span; nothing is dropped. A version goes live only after
  ``finish_weight_update``; an update that fails before that leaves the old weights.
- ``abort`` finishes a request's completions with ``finish_reason="abort"`` and the tokens
  produced so far.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np

from schemas.messages import Sample, WeightManifest


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop_ids: tuple[int, ...] | list[int] = ()
    n: int = 1
    seed: int | None = None
    """Per-request seed: the same request with the same seed samples the same tokens."""


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    version_spans: list[tuple[int, int]] = field(default_factory=list)
    finish_reason: str = ""

    def to_sample(self) -> Sample:
        spans = np.asarray(self.version_spans or [(0, -1)], dtype=np.int32).reshape(-1, 2)
        return Sample(np.asarray(self.token_ids, np.int32), np.asarray(self.logprobs, np.float32),
                      spans, self.finish_reason)


class Engine(abc.ABC):
    @property
    @abc.abstractmethod
    def weight_version(self) -> int: ...

    async def start(self) -> None:
        """Start background work (the step loop). Idempotent."""

    async def stop(self) -> None:
        """Abort everything in flight and stop background work."""

    @abc.abstractmethod
    async def generate(self, request_id: str, prompt_ids: np.ndarray, params: SamplingParams) -> list[Completion]: ...

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    async def pause(self) -> None:
        """Hold generation at the next step boundary (requests stay in flight)."""

    @abc.abstractmethod
    async def resume(self) -> None: ...

    @abc.abstractmethod
    async def start_weight_update(self, version: int, manifest: WeightManifest) -> None:
        """Check the manifest against the model (``ManifestMismatch`` names offenders) and
        pause at the next step boundary."""

    @abc.abstractmethod
    async def update_weights_shm(self, payload: np.ndarray, manifest: WeightManifest) -> list[str]:
        """Load a whole payload from host memory; returns per-bucket digests of what loaded."""

    async def update_weights_ipc(self, handles: object, manifest: WeightManifest) -> list[str]:
        raise RuntimeError(f"{type(self).__name__} does not take CUDA IPC weights")

    async def update_weights_nccl(self, group: object, manifest: WeightManifest) -> list[str]:
        raise RuntimeError(f"{type(self).__name__} does not take NCCL weights")

    @abc.abstractmethod
    async def finish_weight_update(self, version: int) -> None:
        """Make ``version`` live and resume."""

    async def abort_weight_update(self) -> None:
        """Give up an update in progress: keep (or restore) the old weights and resume."""
