"""Engine side of weight updates over shm: offer → verified load → acknowledgement.

Invariants and failure behaviour:
- An offer is applied only if it is newer than the engine's live version; a version goes
  live only after every bucket arrived and matched its digest (``unpack`` verifies before
  anything is copied into the model).
- A manifest that does not match the engine's parameters, a digest mismatch, or a torn
  read (the slot was lapped) leaves the engine on its previous version; the result is
  reported to the publisher as ``WeightsLoaded(ok=False, error=...)`` (a torn read is not
  reported: the newer offer that lapped it is already on its way).
"""

from __future__ import annotations

import time

from schemas.messages import WeightsLoaded, WeightsOffer
from stages.publisher.manifest import DigestMismatch, ManifestMismatch
from stages.publisher.shm import ShmWeightReader, TornRead


class ShmWeightLoader:
    def __init__(self, engine, engine_name: str) -> None:
        self.engine = engine
        self.engine_name = engine_name
        self.reader = ShmWeightReader()
        self.loaded_any = False
        """The engine starts on seeded weights labelled version 0; the first offer is loaded
        even at version 0, so its digests are checked and it is acknowledged."""

    async def apply(self, offer: WeightsOffer) -> WeightsLoaded | None:
        version = offer.manifest.version
        if version < self.engine.weight_version or (version == self.engine.weight_version and self.loaded_any):
            return None
        t0 = time.perf_counter()
        try:
            payload = self.reader.read(offer.location, version)
        except TornRead:
            return None
        except OSError as e:
            return WeightsLoaded(version, self.engine_name, False, [], f"cannot read {offer.location}: {e}")
        try:
            await self.engine.start_weight_update(version, offer.manifest)
        except ManifestMismatch as e:
            return WeightsLoaded(version, self.engine_name, False, [], str(e))
        try:
            digests = await self.engine.update_weights_shm(payload, offer.manifest)
        except DigestMismatch as e:
            await self.engine.abort_weight_update()
            return WeightsLoaded(version, self.engine_name, False, [], str(e))
        await self.engine.finish_weight_update(version)
        self.loaded_any = True
        return WeightsLoaded(version, self.engine_name, True, digests, "", time.perf_counter() - t0)

    def close(self) -> None:
        self.reader.close()
