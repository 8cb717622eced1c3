"""Every message that crosses a socket between stages.

Invariants:
- Each message is a tagged ``msgspec.Struct`` (``array_like`` so the wire carries no field
  names); the tag is the dispatch key. Each class docstring names producer → consumer.
- Schemas evolve append-only: new fields go last and carry a default; a field is never
  renamed, retyped or removed. ``SCHEMA_VERSION`` is bumped when a field is appended, and a
  receiver refuses envelopes whose version is newer than its own (see ``transport.codec``).
- Token ids, logprobs, version spans and expert routing are numpy arrays; the codec sends
  them as raw buffers (separate zero-copy frames when large), never as lists of ints.
- Arrays decoded from the wire are read-only views of the received frames: copy before
  writing to them.
"""

from __future__ import annotations

import enum
from typing import Union

import msgspec
import numpy as np

SCHEMA_VERSION = 2
"""Bumped whenever a field is appended to any message below."""


class Envelope(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """Every sender → every receiver: frame 0 of each multipart message.

    Decoded before the body so that a message from a newer schema, or with a tag this
    receiver does not know, can be refused while still naming who sent it.
    """

    schema_version: int
    """``SCHEMA_VERSION`` of the sender."""
    msg_id: int
    """Per-sender monotonically increasing id (starts at 1)."""
    sender: str
    """``stage/replica`` name of the sending process, e.g. ``rollout/1``."""
    sent_at: float
    """Sender's ``time.time()`` when encoded."""
    tag: str
    """Tag of the body, duplicated here so a receiver can name unknown tags in its log."""


# --------------------------------------------------------------------------- work stream


class PromptGroup(msgspec.Struct, tag="prompt_group", array_like=True, gc=False):
    """source → rollout (PUSH/PULL): one prompt to be sampled ``n_samples`` times."""

    group_id: str
    """Unique id of this prompt group (stable across reissues)."""
    prompt_ids: np.ndarray
    """Prompt token ids, int32 [P]."""
    answer: str
    """Ground truth the reward function checks against (may be empty)."""
    task: str
    """Task name; selects the reward function in the reward stage."""
    n_samples: int
    """G: completions to sample for this prompt."""
    issued_version: int
    """Learner weight version the source saw when it issued the group."""
    attempt: int = 0
    """0 on first issue; incremented on each reissue after a lease expiry."""
    prompt_text: str = ""
    """Human-readable prompt, for logs and reward functions that want text."""


class Sample(msgspec.Struct, array_like=True, gc=False):
    """One completion inside a ``Rollout`` (not sent alone)."""

    token_ids: np.ndarray
    """Sampled completion token ids, int32 [T]."""
    logprobs: np.ndarray
    """Engine logprob of each sampled token, float32 [T], from the logits it sampled with."""
    version_spans: np.ndarray
    """int32 [S, 2]: rows (first_token_index, weight_version); span i covers tokens from its
    index up to the next row's index. One row unless weights changed mid-generation."""
    finish_reason: str
    """``stop`` (stop id sampled), ``length`` (max tokens) or ``abort``."""
    routed_experts: np.ndarray | None = None
    """MoE only: uint16 [T, moe_layers, top_k] experts the engine routed each token to."""


class Rollout(msgspec.Struct, tag="rollout", array_like=True, gc=False):
    """rollout → reward (PUSH/PULL): the G completions of one prompt group."""

    group: PromptGroup
    """The prompt group as issued (carries ids, prompt and answer)."""
    samples: list[Sample]
    """G completions, in sampling order."""
    engine_id: str
    """``stage/replica`` of the engine that produced them."""
    gen_seconds: float = 0.0
    """Wall time from the group's arrival at the engine to its last token."""


class ScoredGroup(msgspec.Struct, tag="scored_group", array_like=True, gc=False):
    """reward → logprob (PUSH/PULL): a rollout with one reward per sample. A logprob stage with
    nothing to add (no reference model) passes it on unread: logprob → learner, where it
    counts as a ``TrainGroup`` without reference logprobs."""

    rollout: Rollout
    rewards: np.ndarray
    """float32 [G] reward of each sample."""
    reward_errors: list[str] = []
    """One entry per sample whose reward function raised or timed out ("" when fine)."""


class TrainGroup(msgspec.Struct, tag="train_group", array_like=True, gc=False):
    """logprob → learner (PUSH/PULL): a scored group ready to train on."""

    scored: ScoredGroup
    ref_logprobs: list[np.ndarray] | None = None
    """Reference-model logprob of each completion token (float32 [T] per sample), or None
    when the loss has no KL term."""
    logprob_version: int = -1
    """Policy version the logprob stage held (-1: no policy copy)."""


class GroupFailed(msgspec.Struct, tag="group_failed", array_like=True, gc=False):
    """any work stage → learner (PUSH/PULL): a group that cannot be trained, with why.

    Lets every issued group reach exactly one terminal state (trained, stale or failed).
    """

    group_id: str
    reason: str
    stage: str


# Batches of the work stream: every message costs each hop (sender, broker, receiver) a
# fixed share of CPU whatever its size, ~100-250 µs on the 2-core default stack (ad hoc), and
# the groups one engine step finishes travel together from there on. A batch is one work
# item to the broker and to a worker's credit; its groups keep their own ids, terminal states
# and failures. Receivers take single groups and batches alike (recordings of either replay).


class RolloutBatch(msgspec.Struct, tag="rollout_batch", array_like=True, gc=False):
    """rollout → reward (PUSH/PULL): the groups one engine finished in the same step (two or
    more; a lone group goes as a ``Rollout``)."""

    rollouts: list[Rollout]


class ScoredBatch(msgspec.Struct, tag="scored_batch", array_like=True, gc=False):
    """reward → logprob (PUSH/PULL): groups the reward stage finished scoring in the same turn
    of its event loop (all of a ``RolloutBatch``, in its order, when its rewards run inline;
    a slow one leaves on its own), two or more. Passed on unread to the learner, like a
    ``ScoredGroup``, when the logprob stage has nothing to add."""

    groups: list[ScoredGroup]


class TrainBatch(msgspec.Struct, tag="train_batch", array_like=True, gc=False):
    """logprob → learner (PUSH/PULL): the groups of one ``ScoredBatch``, in its order, each
    ready to train or failed with its reason."""

    groups: list[Union[TrainGroup, GroupFailed]]


# --------------------------------------------------------------------------- broadcasts


class DroppedGroup(msgspec.Struct, array_like=True, gc=False):
    """A group the learner will never train, and why (inside ``Progress``)."""

    group_id: str
    reason: str
    """``stale``, ``duplicate`` or ``failed: ...``."""


class Progress(msgspec.Struct, tag="progress", array_like=True, gc=False):
    """learner → source, rollout, supervisor (PUB/SUB): what was consumed at a step."""

    step: int
    """Optimizer steps taken so far."""
    version: int
    """Weight version after this step (equals ``step`` unless steps were skipped)."""
    consumed_ids: list[str]
    """Group ids trained on in this step."""
    dropped: list[DroppedGroup] = []
    """Group ids that reached a terminal state other than trained in this step."""
    checkpoint_step: int = -1
    """Step of the learner's newest complete checkpoint (-1: none yet). Groups consumed at
    later steps are lost if the learner restarts (it resumes from that checkpoint), so the
    source keeps them until a checkpoint covers them and reissues them on a rollback."""
    learner_epoch: int = 0
    """Incarnation of the learner that sent this (``WeightsOffer.learner_epoch``; 0: none)."""
    resumed_step: int = -1
    """Step this learner incarnation started from (its resumed checkpoint's; 0: started
    fresh; -1: not set). The source rolls back to it on the first ``Progress`` of a newer
    epoch, even when it missed that incarnation's first messages (PUB/SUB reconnects lose
    what was sent before the subscriber reconnected)."""


class WeightsReady(msgspec.Struct, tag="weights_ready", array_like=True, gc=False):
    """publisher → rollout, logprob, source, supervisor (PUB/SUB): a version is live."""

    version: int
    manifest_path: str = ""
    """Where the manifest of this version lives (shm transport)."""
    transport: str = "shm"
    num_bytes: int = 0
    publish_seconds: float = 0.0
    learner_epoch: int = 0
    """Learner incarnation of this version (its offer's ``learner_epoch``): a newer epoch
    replaces the live version even when its version number is lower (a rollback)."""


class ControlCommand(enum.Enum):
    PAUSE = "pause"
    RESUME = "resume"
    DRAIN = "drain"
    SHUTDOWN = "shutdown"
    REISSUE = "reissue"
    """Source only: a downstream replica restarted; reissue every outstanding group now."""


class Control(msgspec.Struct, tag="control", array_like=True, gc=False):
    """supervisor → every stage (PUB/SUB): pause, resume, drain or shut down."""

    command: ControlCommand
    target: str = "*"
    """``*`` for all, a stage kind (``rollout``) or one replica (``rollout/1``)."""
    reason: str = ""


# --------------------------------------------------------------------------- telemetry


class Heartbeat(msgspec.Struct, tag="heartbeat", array_like=True, gc=False):
    """every process → supervisor (PUSH/PULL): I am alive, and this is what I hold."""

    stage: str
    replica: int
    pid: int
    state: str = "running"
    """``starting``, ``running``, ``draining`` or ``stopped``."""
    in_flight: int = 0
    """Work items accepted but not yet passed on."""
    processed: int = 0
    """Work items passed on since start."""
    weight_version: int = -1


class Metrics(msgspec.Struct, tag="metrics", array_like=True, gc=False):
    """any stage → supervisor (PUSH/PULL): named scalar figures at a step."""

    stage: str
    step: int
    values: dict[str, float]


# --------------------------------------------------------------------------- handshake


class Hello(msgspec.Struct, tag="hello", array_like=True, gc=False):
    """subscriber → publisher's sync socket (DEALER/ROUTER): join, echo ``nonce`` on PUB."""

    nonce: str


class Welcome(msgspec.Struct, tag="welcome", array_like=True, gc=False):
    """publisher → subscriber (PUB/SUB): the subscription carrying ``nonce`` is live."""

    nonce: str
    seq: int


class SnapshotRequest(msgspec.Struct, tag="snapshot_request", array_like=True, gc=False):
    """subscriber → publisher's sync socket: send me the last message of every topic."""

    nonce: str


class Snapshot(msgspec.Struct, tag="snapshot", array_like=True, gc=False):
    """publisher → subscriber (ROUTER/DEALER): last-value cache, as encoded frames.

    ``seq`` is the publisher sequence number at snapshot time; PUB messages with a lower
    or equal sequence are already reflected here and are discarded by the subscriber.
    """

    seq: int
    messages: list[list[bytes]]
    epoch: int = 0
    """Random id of the publisher instance that took the snapshot."""


# --------------------------------------------------------------------------- work queue


class Credit(msgspec.Struct, tag="credit", array_like=True, gc=False):
    """stage replica → supervisor's work broker (DEALER/ROUTER): send me ``n`` more items.

    Work is handed out only against credit, so a replica never holds more than it asked
    for: draining one means it stops asking and finishes what it holds.
    """

    n: int
    worker: str
    """``stage/replica`` of the asking worker."""


# --------------------------------------------------------------------------- operator


class ScaleRequest(msgspec.Struct, tag="scale_request", array_like=True, gc=False):
    """``pipeline scale`` → supervisor (DEALER/ROUTER): run ``replicas`` of ``stage``."""

    stage: str
    replicas: int


class StatusRequest(msgspec.Struct, tag="status_request", array_like=True, gc=False):
    """``pipeline status`` → supervisor (DEALER/ROUTER)."""


class StageStatus(msgspec.Struct, array_like=True, gc=False):
    stage: str
    replicas: int
    alive: int
    restarts: int
    queue_depth: int = 0
    processed: int = 0
    starting: int = 0
    """Alive replicas whose newest heartbeat says ``starting`` (engine or model still
    building: a vLLM rollout takes a minute or more)."""


class StatusReply(msgspec.Struct, tag="status_reply", array_like=True, gc=False):
    """supervisor → ``pipeline status`` / ``pipeline scale`` (ROUTER/DEALER)."""

    ok: bool
    detail: str
    stages: list[StageStatus]
    step: int = 0
    weight_version: int = -1
    reward_mean: float = 0.0
    samples_per_s: float = 0.0
    staleness_mean: float = 0.0


# --------------------------------------------------------------------------- weights


class TensorEntry(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """One parameter inside a weight payload."""

    name: str
    """Parameter name as in the model's ``state_dict`` (e.g. ``model.layers.0.mlp.up_proj.weight``)."""
    dtype: str
    """torch dtype name without prefix: ``float32``, ``bfloat16``, ``float16``."""
    shape: list[int]
    offset: int
    """Byte offset in the whole payload."""
    nbytes: int
    bucket: int
    """Index of the bucket that holds it."""


class WeightBucket(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """A contiguous slice of the payload, moved and verified as a unit."""

    offset: int
    nbytes: int
    digest: str
    """Hex digest (see ``stages.publisher.manifest.digest``) of the bucket's bytes."""


class WeightManifest(msgspec.Struct, array_like=True, gc=False):
    """What a weight payload holds: names, dtypes, shapes, offsets, buckets, version."""

    version: int
    entries: list[TensorEntry]
    buckets: list[WeightBucket]
    total_bytes: int


class CudaIpcHandle(msgspec.Struct, array_like=True, gc=False):
    """One CUDA bucket of the sender as plain fields (inside ``WeightsOffer``, ``cuda_ipc``):
    the arguments of torch's ``rebuild_cuda_tensor`` with the dtype by name and the device by
    GPU UUID (device indices differ between processes). Never pickled. Same fields in the
    same order as ``stages.rollout.engines.vllm_worker.IpcBucketHandle`` (one wire form)."""

    gpu_uuid: str
    size: list[int]
    stride: list[int]
    tensor_offset: int
    dtype: str
    storage_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


class WeightGroup(msgspec.Struct, array_like=True, gc=False):
    """Where engines meet learner rank 0 (rank 0, the sender) for the ``nccl`` transport
    (inside ``WeightsOffer``); buckets are broadcast from rank 0 in manifest order."""

    address: str
    """Host of the rendezvous store, served by the sender."""
    port: int
    group_id: str
    """``<sender instance>:<epoch>``; a new id means the old group is gone: join this one."""
    members: list[str]
    """Engine names in rank order: ``members[i]`` is rank ``i + 1``."""
    backend: str = "nccl"
    """``nccl`` (CUDA buffers) or ``gloo`` (host buffers; tests on CPU)."""
    protocol: str = "torch"
    """``torch``: a ``torch.distributed`` process group over the sender's store (the torch
    engine); ``vllm``: vLLM's ``StatelessProcessGroup`` + ``PyNcclCommunicator`` at
    ``address:port`` (the vLLM engine's worker joins it)."""


class WeightsOffer(msgspec.Struct, tag="weights_offer", array_like=True, gc=False):
    """learner rank 0 → publisher (PUSH/PULL), then publisher → engines (PUB/SUB ``weights``):
    version ``manifest.version`` is staged at ``location``; load it (``start_weight_update``)."""

    manifest: WeightManifest
    transport: str
    """``shm``, ``cuda_ipc`` or ``nccl``."""
    location: str
    """shm: slot file path; cuda_ipc: the sender's GPU; nccl: the group's address."""
    deadline_s: float = 30.0
    """Seconds allowed for each phase of the update: start, each bucket, finish."""
    ipc_handles: list[CudaIpcHandle] = []
    """``cuda_ipc``: one handle per manifest bucket (a flat uint8 CUDA tensor of its bytes)."""
    group: WeightGroup | None = None
    """``nccl``: the broadcast group to join (if not joined yet) and receive from."""
    staged_at: float = 0.0
    """Sender's ``time.time()`` when the bytes were staged (``nccl``: an engine that sees the
    offer later than the start deadline knows the broadcast is gone)."""
    canary_ids: np.ndarray | None = None
    """int32 [C]: the canary prompt; engines report teacher-forced logprobs of it."""
    canary_logprobs: np.ndarray | None = None
    """float32 [C-1]: the learner's logprob of ``canary_ids[t+1]`` given ``canary_ids[:t+1]``."""
    learner_epoch: int = 0
    """Incarnation of the learner that staged this version (grows with every learner start;
    0: unknown). Versions are ordered within an epoch only: a learner restarted from an older
    checkpoint offers lower versions under a newer epoch, and they supersede every version of
    the older epochs (their timeline no longer exists). See ``stages.rollout.weights``."""


class WeightsLoaded(msgspec.Struct, tag="weights_loaded", array_like=True, gc=False):
    """engine → publisher (PUSH/PULL): result of loading a version, with per-bucket digests
    computed on what the engine loaded."""

    version: int
    engine: str
    ok: bool
    digests: list[str] = []
    error: str = ""
    load_seconds: float = 0.0
    learner_epoch: int = 0
    """``learner_epoch`` of the offer this answers (the publisher matches version and epoch)."""


class CanaryReport(msgspec.Struct, tag="canary_report", array_like=True, gc=False):
    """engine → publisher (PUSH/PULL ``publish``): the engine's teacher-forced logprobs of the
    offer's canary prompt, run on the version it just loaded. Sent after that version's
    ``WeightsLoaded``, so the canary's forward pass never delays ``WeightsReady``."""

    version: int
    engine: str
    logprobs: np.ndarray
    """float32 [C-1]: logprob of ``canary_ids[t+1]`` given ``canary_ids[:t+1]``."""


Message = Union[
    PromptGroup,
    Rollout,
    ScoredGroup,
    TrainGroup,
    GroupFailed,
    Progress,
    WeightsReady,
    Control,
    Heartbeat,
    Metrics,
    Hello,
    Welcome,
    SnapshotRequest,
    Snapshot,
    Credit,
    ScaleRequest,
    StatusRequest,
    StatusReply,
    WeightsOffer,
    WeightsLoaded,
    CanaryReport,
    RolloutBatch,
    ScoredBatch,
    TrainBatch,
]
"""Every wire message; the codec decodes bodies against this tagged union."""

MESSAGE_TYPES: tuple[type, ...] = Message.__args__  # type: ignore[attr-defined]
TAGS: dict[str, type] = {t.__struct_config__.tag: t for t in MESSAGE_TYPES}
