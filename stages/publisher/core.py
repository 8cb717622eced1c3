"""Publisher control plane (pure): which engines must confirm a version, and when it is live.

The bytes never pass through the publisher: learner rank 0 stages them (shm slot, CUDA IPC
handles or an NCCL group) and sends a ``WeightsOffer``; the publisher forwards the offer to
every engine, collects each engine's ``WeightsLoaded`` (with per-bucket digests computed on
what it loaded) and declares the version ready once every expected engine confirmed it with
digests equal to the manifest's.

Invariants and failure behaviour:
- Versions are handled in order; a newer offer supersedes a pending older one (its
  stragglers no longer matter: engines always load the newest offer).
- A digest that differs from the manifest counts as a failure of that engine for that
  version; the engine stays on its previous version (it refuses to go live itself).
- An engine that misses a deadline is marked lagging and no longer waited for, until it
  confirms any version again; the version is then ready with the engines that did confirm,
  and the lag is reported. An engine that restarts pulls the newest offer (last-value cache
  of the ``weights`` broadcast) before it accepts work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.messages import WeightsLoaded, WeightsOffer, WeightsReady


@dataclass
class PendingVersion:
    offer: WeightsOffer
    offered_at: float
    waiting_for: set[str]
    confirmed: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


class PublisherCore:
    def __init__(self, expected_engines: set[str]) -> None:
        self.expected = set(expected_engines)
        self.lagging: set[str] = set()
        self.pending: PendingVersion | None = None
        self.live_version = -1
        self.incomplete_versions: list[int] = []

    def offer(self, offer: WeightsOffer, now: float) -> WeightsOffer:
        """Register a staged version; returns the offer to broadcast to engines."""
        if self.pending is not None:
            self.incomplete_versions.append(self.pending.offer.manifest.version)
        self.pending = PendingVersion(offer, now, self.expected - self.lagging)
        return offer

    def loaded(self, ack: WeightsLoaded) -> WeightsReady | None:
        """Record an engine's result; returns ``WeightsReady`` when the version is live."""
        self.expected.add(ack.engine)
        self.lagging.discard(ack.engine)
        p = self.pending
        if p is None or ack.version != p.offer.manifest.version:
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
        """Deadline check; engines still silent become lagging."""
        p = self.pending
        if p is None or now - p.offered_at < p.offer.deadline_s:
            return None
        self.lagging |= p.waiting_for
        p.waiting_for.clear()
        return self._maybe_ready()

    def _maybe_ready(self) -> WeightsReady | None:
        p = self.pending
        if p is None or p.waiting_for:
            return None
        self.pending = None
        version = p.offer.manifest.version
        if not p.confirmed:
            self.incomplete_versions.append(version)
            return None
        self.live_version = version
        return WeightsReady(version, p.offer.location, p.offer.transport, p.offer.manifest.total_bytes,
                            max(p.confirmed.values(), default=0.0))
