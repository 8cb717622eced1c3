"""The stack file: one TOML that describes a whole pipeline run, decoded into typed Structs.

Invariants:
- Every section forbids unknown fields; a typo is an error naming the file and the field.
- Cross-field rules live in ``Stack.validate()`` and raise ``StackError`` with a message
  naming the field (e.g. ``rollout.replicas``) and what is wrong.
- Addresses not given are assigned at ``pipeline up`` time (free loopback ports) and written
  to ``endpoints.json`` in the run directory; stages never invent addresses.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

_CFG = dict(forbid_unknown_fields=True, kw_only=True)


class StackError(ValueError):
    """A stack file is invalid; the message names the file, the field and the problem."""


class RunSection(msgspec.Struct, **_CFG):
    name: str = "run"
    """Run name, shown in the terminal and logs."""
    dir: str = ""
    """Run directory (logs, metrics, recordings, checkpoints). Default: ``runs/<name>``."""
    seed: int = 0
    """Seed for data order, sampling and model init."""
    max_staleness: int = 2
    """Largest allowed gap (in weight versions) between the learner and the weights that
    produced a sample's oldest token; 0 makes the pipeline synchronous."""
    record: list[str] = []
    """Sockets whose received traffic is recorded to ``<dir>/recordings/`` (e.g. ``rollouts``)."""
    bind_host: str = "127.0.0.1"
    """Host that auto-assigned TCP addresses bind to."""
    shutdown_timeout_s: float = 10.0
    """Seconds a stop (Ctrl-C, SIGTERM, ``--max-steps``) may take before stages are killed:
    most of it is the drain, in which the learner writes its final checkpoint (model and
    AdamW state: ~7 GB for a 0.6B model in fp32). ``pipeline up --shutdown-timeout`` overrides."""
    worker_nice: int | None = None
    """Scheduling niceness (0-19) of the stages that can run ahead of the learner: rollout,
    reward and logprob (not the source, whose issuing all generation waits on). With
    ``max_staleness > 0`` the learner is the stack's critical path, and those stages have
    slack (they wait at the staleness gate); where they share CPU cores with it, they should
    yield the CPU to it. None: 19 when the learner trains on the CPU, else 0 (off)."""
    learner_cpus: list[int] | None = None
    """CPU ids the learner's processes are pinned to (scheduler affinity, inherited by all
    their threads); [] never pins. None: pinned to the first core the stack may use when
    the learner trains on the CPU with one rank and one thread (the default stack on a small
    machine), else not pinned. A one-thread learner that the scheduler moves between cores
    finds its caches cold after each move, and so does the stage it displaced; pinned, it
    keeps one core and the other stages take the rest. On the 2-core default stack, async
    over sync, four pairs alternating: 1.40, 1.79, 1.42, 1.36 pinned against 1.32, 1.36,
    1.27, 1.29 not."""


class ModelSection(msgspec.Struct, **_CFG):
    name: str = "tiny"
    """Built-in shape (``tiny``, ``tiny-moe``, ``qwen3-0.6b``, ``qwen3-1.7b``) or a local
    Hugging Face checkpoint directory."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of inference copies (engines, logprob); the learner keeps fp32 masters."""


class TaskSection(msgspec.Struct, **_CFG):
    name: str = "repeat"
    """Built-in task name, or ``module:function`` returning a task."""
    dataset: str = ""
    """Optional jsonl/parquet file of prompts; empty uses the task's own generator."""
    prompt_field: str = "prompt"
    """Dataset field holding the prompt text."""
    answer_field: str = "answer"
    """Dataset field holding the answer the reward checks against."""
    reward: str = ""
    """Optional ``module:function(completion, answer) -> float`` overriding the task's reward."""


class SourceSection(msgspec.Struct, **_CFG):
    replicas: int = 1
    """Always 1: the source owns the cursor and the issued set."""
    group_size: int = 8
    """G: completions sampled per prompt (GRPO group size)."""
    lease_s: float = 120.0
    """A group not consumed within this many seconds is reissued (at-least-once)."""


class RolloutSection(msgspec.Struct, **_CFG):
    replicas: int = 2
    """Engine processes; each pulls prompt groups from the same queue."""
    engine: Literal["torch", "vllm"] = "torch"
    """``torch`` (built-in, CPU or GPU) or ``vllm`` (GPU)."""
    device: str = "cpu"
    """Torch device of the engine (``cpu``, ``cuda``, ``cuda:1``)."""
    max_batch: int = 64
    """Sequences decoded together at most."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_tokens: int = 16
    """Completion tokens per sample at most."""
    weight_transport: Literal["shm", "cuda_ipc", "nccl"] = "shm"
    """How engines receive weights from learner rank 0: ``shm`` (host shared memory),
    ``cuda_ipc`` (the learner's CUDA buffers mapped by engines on the same host), ``nccl``
    (broadcast to engines on other GPUs; one engine per GPU, none on learner rank 0's)."""
    gpu_memory_utilization: float = 0.5
    """vLLM only: fraction of GPU memory the engine may take."""


class RewardSection(msgspec.Struct, **_CFG):
    replicas: int = 1
    """Reward processes."""
    timeout_s: float = 5.0
    """Per-sample time limit; a reward that runs longer scores 0 and is counted."""
    workers: int = 1
    """Worker processes per reward replica running the reward functions."""
    isolation: Literal["process", "inline", "auto"] = "auto"
    """Where reward functions run: ``process`` (worker interpreters with the time limit),
    ``inline`` (the stage's own thread, no limit: trusted fast code only) or ``auto``
    (inline for the built-in linear-time rewards ``repeat``/``copy``/``reverse``/``exact``,
    workers for everything else)."""


class LogprobSection(msgspec.Struct, **_CFG):
    replicas: int = 1
    """Logprob processes."""
    reference: bool = False
    """Compute reference-model logprobs (needed when ``learner.kl_coef > 0``)."""
    device: str = "cpu"
    """Torch device of the reference model."""


class LearnerSection(msgspec.Struct, **_CFG):
    world_size: int = 1
    """FSDP2 ranks (processes); gloo on CPU, NCCL on GPU."""
    device: str = "cpu"
    """``cpu`` or ``cuda`` (rank r uses ``cuda:r``)."""
    loss: Literal["grpo", "ppo"] = "grpo"
    """GRPO (group-normalised advantages, on-policy ratio) or PPO clipped objective."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear LR warm-up steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    clip_eps: float = 0.2
    """PPO clip range."""
    tis_cap: float = 2.0
    """Truncated importance-sampling cap on trainer/engine probability ratios."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference model (needs ``logprob.reference``)."""
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    """How token losses are averaged."""
    groups_per_step: int = 8
    """Prompt groups per optimizer step."""
    micro_batch_tokens: int = 4096
    """Token budget of one packed micro-batch."""
    shared_row_tokens: int = 512
    """Longest row into which a group's completions are packed behind one copy of their
    prompt (each attends to the prompt and itself only); 0 gives every completion a row of
    its own. Capped at ``micro_batch_tokens``; MoE models always get a row per completion.
    Also used by the logprob stage's reference scoring."""
    checkpoint_every: int = 10
    """Checkpoint every N steps (0 disables)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept."""
    activation_checkpointing: bool = False
    """Recompute decoder layers in backward to save memory."""
    compile_layers: bool = False
    """``torch.compile`` each decoder layer (dynamic shapes): fewer, fused kernels, after a
    one-off compile of tens of seconds in the first steps. For GPU learners."""
    async_checkpoint: bool = False
    """Periodic checkpoints copy the state to host memory and write it in the background
    while training goes on (DCP ``async_save`` over a gloo group of its own); a checkpoint
    counts (``COMPLETE``, resume point, the source's ``checkpoint_step``) only once written.
    Pays where the write is long (GB-sized learners); on the tiny CPU default its CPU work
    competes with training. The final checkpoint of a drain is always waited for."""


class PublisherSection(msgspec.Struct, **_CFG):
    every_steps: int = 1
    """Publish weights after every N optimizer steps."""
    deadline_s: float = 30.0
    """Deadline for each phase of an update (start, each bucket, finish)."""
    bucket_mb: int = 256
    """Bucket size for packing weights."""


class Stack(msgspec.Struct, **_CFG):
    """A whole pipeline. Every stage section is required (a stack names all its stages);
    ``run``, ``model`` and ``task`` have defaults."""

    run: RunSection = msgspec.field(default_factory=RunSection)
    model: ModelSection = msgspec.field(default_factory=ModelSection)
    task: TaskSection = msgspec.field(default_factory=TaskSection)
    source: SourceSection
    rollout: RolloutSection
    reward: RewardSection
    logprob: LogprobSection
    learner: LearnerSection
    publisher: PublisherSection
    addresses: dict[str, str] = {}
    """Optional fixed socket addresses by name (see ``pipeline.endpoints``)."""

    def validate(self) -> "Stack":
        def fail(field: str, why: str) -> None:
            raise StackError(f"{field}: {why}")

        if self.source.replicas != 1:
            fail("source.replicas", "must be 1 (the source owns the cursor)")
        for name in ("rollout", "reward", "logprob"):
            if getattr(self, name).replicas < 1:
                fail(f"{name}.replicas", "must be at least 1")
        if self.learner.world_size < 1:
            fail("learner.world_size", "must be at least 1")
        if self.run.max_staleness < 0:
            fail("run.max_staleness", "must be >= 0")
        if self.run.shutdown_timeout_s <= 0:
            fail("run.shutdown_timeout_s", "must be > 0")
        if self.run.worker_nice is not None and not 0 <= self.run.worker_nice <= 19:
            fail("run.worker_nice", "must be in 0..19 (a stage may only lower its own priority)")
        cpus = self.run.learner_cpus or []
        if any(c < 0 for c in cpus) or len(set(cpus)) != len(cpus):
            fail("run.learner_cpus", f"must be distinct CPU ids >= 0, got {cpus}")
        if self.source.group_size < 2 and self.learner.loss == "grpo":
            fail("source.group_size", "GRPO needs at least 2 samples per group")
        if self.learner.kl_coef > 0 and not self.logprob.reference:
            fail("learner.kl_coef", "> 0 needs logprob.reference = true")
        if not 0 < self.rollout.top_p <= 1:
            fail("rollout.top_p", "must be in (0, 1]")
        if self.rollout.temperature <= 0:
            fail("rollout.temperature", "must be > 0")
        if self.rollout.engine == "vllm" and not self.rollout.device.startswith("cuda"):
            fail("rollout.device", "the vllm engine needs a cuda device")
        if self.rollout.weight_transport != "shm" and not self.rollout.device.startswith("cuda"):
            fail("rollout.weight_transport", f"{self.rollout.weight_transport} needs a cuda device")
        if self.rollout.weight_transport == "nccl":
            if self.rollout.replicas > 1:
                fail("rollout.replicas", "nccl: each engine of the weight group needs its own GPU and "
                     "rollout.device names one; use 1 replica, or cuda_ipc")
            if self.learner.device.startswith("cuda") and _gpu_index(self.rollout.device) == _gpu_index(self.learner.device):
                fail("rollout.device", "nccl: the engine shares learner rank 0's GPU (NCCL refuses two ranks "
                     "on one GPU); use cuda_ipc on a shared GPU")
        if self.publisher.deadline_s <= 0:
            fail("publisher.deadline_s", "must be > 0")
        if self.publisher.every_steps < 1:
            fail("publisher.every_steps", "must be at least 1")
        if not self.run.dir:
            self.run.dir = f"runs/{self.run.name}"
        return self


def _gpu_index(device: str) -> int:
    return int(device.partition(":")[2] or 0)


def load_stack(path: str | Path) -> Stack:
    """Decode and validate a stack file; errors are ``StackError`` naming file and field."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise StackError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise StackError(f"{path}: not valid TOML: {e}") from None
    try:
        stack = msgspec.convert(raw, Stack)
    except msgspec.ValidationError as e:
        raise StackError(f"{path}: {e}") from None
    try:
        return stack.validate()
    except StackError as e:
        raise StackError(f"{path}: {e}") from None


def write_stack_toml(raw: dict, path: str | Path, **run: Any) -> Path:
    """Write ``raw`` (a stack file as ``tomllib`` read it) to ``path`` as TOML, with the given
    ``[run]`` fields set: how benchmarks derive variants of one stack (e.g. ``max_staleness``).
    Values are written as JSON literals, which TOML reads back unchanged for what stack files
    hold (strings, numbers, booleans, flat lists); a nested table raises ``ValueError``."""
    tables = {name: dict(values) for name, values in raw.items()}
    tables.setdefault("run", {}).update(run)
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            if isinstance(value, dict):
                raise ValueError(f"[{name}] {key}: nested tables are not written")
            lines.append(f"{key} = {json.dumps(value)}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def dump_stack(stack: Stack) -> dict:
    """Plain-dict form (e.g. to pass a stack to a child process as JSON)."""
    return msgspec.to_builtins(stack)
