"""Publisher control plane (pure): which engines must confirm a version, and when it is live.

The bytes never pass through the publisher: learner rank 0 stages them (shm slot, CUDA IPC
handles or an NCCL group) and sends a ``WeightsOffer``; the publisher forwards the offer to
every engine, collects each engine's ``WeightsLoaded`` (with per-bucket digests computed on
what it loaded) and declares the version ready once every expected engine confirmed it with
digests equal to the manifest's.

Deadlines: ``WeightsOffer.deadline_s`` bounds each phase of an update (start, each bucket,
finish), so a whole update may take ``update_budget_s`` = ``deadline_s × (buckets + 2)``.
Engines enforce the phases themselves (``stages.rollout.weights``) and abort on expiry; the
publisher stops waiting for an engine once the budget is spent.

Canary: the offer may carry the learner's teacher-forced logprobs of a fixed prompt; after
acknowledging a version each engine sends a ``CanaryReport`` with its own, computed on the
version it just loaded; ``canary_gap`` is their mean and max absolute difference, kept per
engine per version (``canaries``, the newest ``CANARY_VERSIONS`` versions).

Learner epochs: every offer carries its learner's incarnation (``learner_epoch``, see
``stages.rollout.weights``). An offer of a newer epoch is taken whatever its version: a
learner restarted from an older checkpoint re-offers lower versions, engines load them
(dropping the newer-numbered weights of the timeline that no longer exists), and they
become live here (``live_version`` may go down, ``WeightsReady`` carries the epoch). An
offer of an older epoch than the newest seen is dropped (``offer`` returns None): a late
message of a learner that no longer exists. Acknowledgements count only for the pending
(version, epoch). Canary figures of the abandoned timeline (versions ≥ the newer epoch's
first offer) are forgotten.

Invariants and failure behaviour:
- Versions are handled in order; a newer offer supersedes a pending older one (its
  stragglers no longer matter: engines always load the newest offer). Within an epoch the
  order is the learner's; across epochs the newer epoch wins.
- A digest that differs from the manifest counts as a failure of that engine for that
  version; the engine stays on its previous version (it refuses to go live itself).
- An engine that misses the budget is marked lagging and no longer waited for, until it
  confirms any version again; the version is then ready with the engines that did confirm,
  and the lag is reported. An engine that restarts pulls the newest offer (last-value cache
  of the ``weights`` broadcast) before it accepts work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from schemas.messages import CanaryReport, WeightsLoaded, WeightsOffer, WeightsReady


def update_budget_s(deadline_s: float, n_buckets: int) -> float:
    """Longest a whole update may take when each phase (start, every bucket, finish) gets ``deadline_s``."""
    return deadline_s * (n_buckets + 2)


def canary_gap(learner: np.ndarray | None, engine: np.ndarray | None) -> tuple[float, float] | None:
    """(mean, max) |learner − engine| canary logprob, or None when either side has none."""
    a, b = learner, engine
    if a is None or b is None or len(a) != len(b) or len(a) == 0:
        return None
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if not np.isfinite(d).all():
        return float("inf"), float("inf")
    return float(d.mean()), float(d.max())


@dataclass
class PendingVersion:
    offer: WeightsOffer
    offered_at: float
    waiting_for: set[str]
    confirmed: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def budget_s(self) -> float:
        return update_budget_s(self.offer.deadline_s, len(self.offer.manifest.buckets))


class PublisherCore:
    def __init__(self, expected_engines: set[str]) -> None:
        self.expected = set(expected_engines)
        self.lagging: set[str] = set()
        self.pending: PendingVersion | None = None
        self.live_version = -1
        self.live_epoch = 0
        """Learner epoch of ``live_version``."""
        self.learner_epoch = 0
        """Newest learner epoch seen in an offer; older ones are dropped."""
        self.incomplete_versions: list[int] = []
        self.canaries: dict[int, dict[str, tuple[float, float]]] = {}
        """version → engine → (mean, max) canary gap; the newest ``CANARY_VERSIONS`` kept."""
        self.learner_canary: dict[int, np.ndarray] = {}
        """version → the learner's canary logprobs from its offer (same retention)."""
        self.last_failed: dict[str, str] = {}
        """engine → why it failed the last version that completed (for logs and metrics)."""

    CANARY_VERSIONS = 16

    def offer(self, offer: WeightsOffer, now: float) -> WeightsOffer | None:
        """Register a staged version; returns the offer to broadcast to engines, or None for
        an offer of an older learner epoch than one already seen (not broadcast)."""
        if offer.learner_epoch < self.learner_epoch:
            return None
        if offer.learner_epoch > self.learner_epoch:
            self.learner_epoch = offer.learner_epoch
            for per_version in (self.canaries, self.learner_canary):  # the abandoned timeline's
                for v in [v for v in per_version if v >= offer.manifest.version]:
                    del per_version[v]
        if self.pending is not None:
            self.incomplete_versions.append(self.pending.offer.manifest.version)
        self.pending = PendingVersion(offer, now, self.expected - self.lagging)
        if offer.canary_logprobs is not None:
            self.learner_canary[offer.manifest.version] = offer.canary_logprobs
            self._trim(self.learner_canary)
        return offer

    def canary(self, report: CanaryReport) -> tuple[float, float] | None:
        """Record an engine's canary; returns its (mean, max) gap to the learner's, or None
        when the learner's canary of that version is unknown (or lengths differ)."""
        gap = canary_gap(self.learner_canary.get(report.version), report.logprobs)
        if gap is not None:
            self.canaries.setdefault(report.version, {})[report.engine] = gap
            self._trim(self.canaries)
        return gap

    def _trim(self, d: dict) -> None:
        while len(d) > self.CANARY_VERSIONS:
            del d[min(d)]

    def loaded(self, ack: WeightsLoaded) -> WeightsReady | None:
        """Record an engine's result; returns ``WeightsReady`` when the version is live."""
        self.expected.add(ack.engine)
        self.lagging.discard(ack.engine)
        p = self.pending
        if p is None or ack.version != p.offer.manifest.version or ack.learner_epoch != p.offer.learner_epoch:
            return None
        want = [b.digest for b in p.offer.manifest.buckets]
        if not ack.ok:
            p.failed[ack.engine] = ack.error or "failed"
        elif ack.digests != want:
            bad = [i for i, (a, b) in enumerate(zip(ack.digests, want)) if a != b]
            p.failed[ack.engine] = f"digest mismatch in bucket(s) {bad or 'count'}"
        else:
            p.confirmed[ack.engine] = ack.load_seconds
        p.waiting_for.discard(ack.engine)
        return self._maybe_ready()

    def expire(self, now: float) -> WeightsReady | None:
        """Deadline check; engines still silent once the update budget is spent become lagging."""
        p = self.pending
        if p is None or now - p.offered_at < p.budget_s:
            return None
        self.lagging |= p.waiting_for
        for e in p.waiting_for:
            p.failed[e] = f"no acknowledgement within {p.budget_s:.1f} s"
        p.waiting_for.clear()
        return self._maybe_ready()

    def _maybe_ready(self) -> WeightsReady | None:
        p = self.pending
        if p is None or p.waiting_for:
            return None
        self.pending = None
        self.last_failed = dict(p.failed)
        version = p.offer.manifest.version
        if not p.confirmed:
            self.incomplete_versions.append(version)
            return None
        self.live_version, self.live_epoch = version, p.offer.learner_epoch
        return WeightsReady(version, p.offer.location, p.offer.transport, p.offer.manifest.total_bytes,
                            max(p.confirmed.values(), default=0.0), p.offer.learner_epoch)
