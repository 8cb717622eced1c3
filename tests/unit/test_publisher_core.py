"""Publisher control plane: a version is ready only when every live engine confirmed it."""

from schemas.messages import WeightBucket, WeightManifest, WeightsLoaded, WeightsOffer
from stages.publisher.core import PublisherCore


def offer(v, deadline=5.0):
    man = WeightManifest(v, [], [WeightBucket(0, 64, "aa"), WeightBucket(64, 64, "bb")], 128)
    return WeightsOffer(man, "shm", f"/dev/shm/x{v}", deadline)


def ok(v, engine, digests=("aa", "bb")):
    return WeightsLoaded(v, engine, True, list(digests), "", 0.1)


def test_ready_after_every_engine_confirms():
    core = PublisherCore({"rollout/0", "rollout/1"})
    core.offer(offer(1), now=0)
    assert core.loaded(ok(1, "rollout/0")) is None
    ready = core.loaded(ok(1, "rollout/1"))
    assert ready is not None and ready.version == 1 and core.live_version == 1


def test_digest_mismatch_is_a_failure_not_a_confirmation():
    core = PublisherCore({"rollout/0", "rollout/1"})
    core.offer(offer(1), now=0)
    core.loaded(ok(1, "rollout/0", ("aa", "XX")))
    ready = core.loaded(ok(1, "rollout/1"))
    assert ready.version == 1  # the good engine went live; the bad one stayed on v0
    assert core.live_version == 1


def test_silent_engine_misses_deadline_then_is_not_waited_for():
    core = PublisherCore({"rollout/0", "rollout/1"})
    core.offer(offer(1, deadline=2), now=0)  # 2 s per phase: start, 2 buckets, finish = 8 s
    core.loaded(ok(1, "rollout/0"))
    assert core.expire(now=7.9) is None
    ready = core.expire(now=8.1)
    assert ready.version == 1 and core.lagging == {"rollout/1"}
    core.offer(offer(2), now=9)
    assert core.loaded(ok(2, "rollout/0")).version == 2  # rollout/1 is lagging: not awaited
    core.offer(offer(3), now=10)
    assert core.loaded(ok(3, "rollout/1")) is None  # it is back, and rollout/0 is awaited again
    assert core.lagging == set()


def test_nobody_confirmed_means_not_ready():
    core = PublisherCore({"rollout/0"})
    core.offer(offer(1, deadline=1), now=0)
    assert core.loaded(WeightsLoaded(1, "rollout/0", False, [], "manifest mismatch")) is None
    assert core.live_version == -1 and core.incomplete_versions == [1]


def test_newer_offer_supersedes_pending_one():
    core = PublisherCore({"rollout/0"})
    core.offer(offer(1), now=0)
    core.offer(offer(2), now=1)
    assert core.loaded(ok(1, "rollout/0")) is None
    assert core.loaded(ok(2, "rollout/0")).version == 2
    assert core.incomplete_versions == [1]


def test_canary_gap_per_engine_and_version():
    import numpy as np

    from schemas.messages import CanaryReport

    core = PublisherCore({"rollout/0", "rollout/1"})
    o = offer(1)
    o.canary_ids = np.arange(4, dtype=np.int32)
    o.canary_logprobs = np.array([-1.0, -2.0, -3.0], np.float32)
    core.offer(o, now=0)
    core.loaded(ok(1, "rollout/0"))
    assert core.loaded(ok(1, "rollout/1")).version == 1  # readiness never waits for canaries
    mean, mx = core.canary(CanaryReport(1, "rollout/0", np.array([-1.0, -2.5, -3.0], np.float32)))
    assert abs(mean - 0.5 / 3) < 1e-9 and mx == 0.5 and core.canaries[1] == {"rollout/0": (mean, mx)}
    assert core.canary(CanaryReport(1, "rollout/1", np.zeros(2, np.float32))) is None  # wrong length
    assert core.canary(CanaryReport(7, "rollout/1", np.zeros(3, np.float32))) is None  # unknown version


def at_epoch(o, epoch):
    import msgspec

    return msgspec.structs.replace(o, learner_epoch=epoch)


def test_a_rolled_back_learner_goes_live_at_a_lower_version_under_a_newer_epoch():
    """Learner epoch 1 published up to v28 and died; epoch 2 resumed step 20 and offers v20."""
    import msgspec
    import numpy as np

    from schemas.messages import CanaryReport

    core = PublisherCore({"rollout/0"})
    canaried = {}
    for v in (19, 28):
        o = at_epoch(offer(v), 1)
        o.canary_logprobs = np.zeros(3, np.float32)
        core.offer(o, now=0)
        assert core.loaded(msgspec.structs.replace(ok(v, "rollout/0"), learner_epoch=1)).version == v
        canaried[v] = core.canary(CanaryReport(v, "rollout/0", np.zeros(3, np.float32)))
    assert (core.live_version, core.live_epoch) == (28, 1) and set(core.canaries) == {19, 28}

    assert core.offer(at_epoch(offer(20), 2), now=1) is not None  # broadcast, though 20 < 28
    assert set(core.canaries) == set(core.learner_canary) == {19}  # 28 was of the lost timeline
    stale = msgspec.structs.replace(ok(20, "rollout/0"), learner_epoch=1)
    assert core.loaded(stale) is None and core.pending is not None  # not an answer to epoch 2's v20
    ready = core.loaded(msgspec.structs.replace(ok(20, "rollout/0"), learner_epoch=2))
    assert (ready.version, ready.learner_epoch) == (20, 2)
    assert (core.live_version, core.live_epoch) == (20, 2)

    assert core.offer(at_epoch(offer(29), 1), now=2) is None  # a late offer of the dead learner
    assert core.pending is None and core.learner_epoch == 2
    assert core.offer(at_epoch(offer(21), 2), now=3) is not None


def test_next_learner_epoch_grows_with_every_start(tmp_path):
    from stages.publisher.outlet import EPOCH_FILE, next_learner_epoch

    assert [next_learner_epoch(tmp_path) for _ in range(3)] == [1, 2, 3]
    assert (tmp_path / EPOCH_FILE).read_text().strip() == "3"
    assert not list(tmp_path.glob("*.tmp"))


def bare_outlet(rank: int, sender, offers=None, log=None):
    """A ``WeightOutlet`` in the state ``__init__`` leaves it in after its first offer, on
    stand-ins for the sender, the offer socket and the log (no stage context)."""
    import threading

    from stages.publisher import outlet as outlet_mod

    out = outlet_mod.WeightOutlet.__new__(outlet_mod.WeightOutlet)
    out.ctx = type("Ctx", (), {"log": log})()
    out.rank, out.sender, out.offers, out.ready_seen, out._canaried = rank, sender, offers, None, True
    out.phase, out.shipping, out._reported, out.epoch, out.canary = "idle", None, "", 1, None
    out.engine_dtype, out.device, out._staged = None, None, threading.Event()
    out._staged.set()
    return out


class RecordingLearner:
    """A learner whose parameter gather only notes ``gather <version>`` in ``events``."""

    def __init__(self, events: list[str]) -> None:
        self.events, self.version = events, 1

    def full_parameters(self, dtype, device):
        self.events.append(f"gather {self.version}")
        return {}


def test_a_publish_that_hangs_reports_its_phase_and_every_threads_stack(monkeypatch, capfd):
    """The watchdog fires while the publish is still stuck (not after it returns): a GPU
    stack once stalled inside a publish with nothing in any log."""
    import asyncio
    import threading

    from stages.publisher import outlet as outlet_mod

    class Log:
        def __init__(self) -> None:
            self.lines: list[tuple[str, dict]] = []

        def warning(self, event: str, **kw) -> None:
            self.lines.append((event, kw))

    release = threading.Event()

    class StuckLearner:
        version = 7

        def full_parameters(self, dtype, device):
            release.wait(5.0)  # stands in for a gather (or a settle wait) that does not return
            return {}

    monkeypatch.setattr(outlet_mod, "SLOW_PUBLISH_S", 0.05)  # _canaried: not the first publish
    from stages.publisher.senders import CudaIpcSender

    out = bare_outlet(rank=1, sender=CudaIpcSender(), log=Log())

    async def scenario() -> list:
        task = asyncio.ensure_future(out.publish(StuckLearner()))
        await asyncio.sleep(0.5)
        seen = list(out.ctx.log.lines)  # reported while the publish is still running
        assert not task.done()
        release.set()
        await task
        return seen

    seen = asyncio.run(scenario())
    assert [(e, kw["version"], kw["phase"]) for e, kw in seen] == [("publish still running", 7, "gather")]
    assert seen[0][1]["running_s"] >= 0.05
    assert (seen[0][1]["pending"], seen[0][1]["settled"]) == (None, -1)  # the cuda_ipc sender's settle state
    assert "full_parameters" in capfd.readouterr().err  # the stuck thread's stack
    assert out.phase == "idle"


def test_publish_returns_once_the_model_is_read_and_staging_runs_beside_the_next_step():
    """Rank 0: ``publish`` returns after the gather; the sender stages (and the offer goes
    out) while the learner goes on; the next publish waits for that first."""
    import asyncio
    import threading

    from schemas.messages import WeightManifest, WeightsOffer

    release = threading.Event()
    events: list[str] = []

    class Sender:
        transport = "shm"

        def stage(self, params, version):
            events.append(f"stage {version} start")
            release.wait(5.0)
            events.append(f"stage {version} end")
            return WeightsOffer(WeightManifest(version, [], [], 0), "shm", "", 1.0)

        def deliver(self):
            pass

    class Offers:
        async def send(self, offer):
            events.append(f"offer {offer.manifest.version}")

    out = bare_outlet(rank=0, sender=Sender(), offers=Offers())
    learner = RecordingLearner(events)

    async def scenario() -> None:
        await asyncio.wait_for(out.publish(learner), 2.0)  # returns although staging blocks
        await asyncio.sleep(0.1)
        assert events == ["gather 1", "stage 1 start"] and out.shipping is not None
        learner.version = 2  # "the next step"
        second = asyncio.ensure_future(out.publish(learner))
        await asyncio.sleep(0.1)
        assert not second.done() and "gather 2" not in events  # waits for version 1's offer
        release.set()
        await second
        await out.shipped()

    asyncio.run(scenario())
    assert events == ["gather 1", "stage 1 start", "stage 1 end", "offer 1",
                      "gather 2", "stage 2 start", "stage 2 end", "offer 2"]


def test_a_read_in_the_training_thread_waits_for_the_last_staging_not_for_its_offer():
    """The learner's step thread reads the next version (``read``) while the last one's
    offer may still be going out; it only waits until the sender has staged that version
    (one gathered copy of the model at a time), and ``ship`` keeps offers in order."""
    import asyncio
    import threading

    from schemas.messages import WeightManifest, WeightsOffer

    staging, offering = threading.Event(), asyncio.Event()
    events: list[str] = []

    class Sender:
        transport = "shm"

        def stage(self, params, version):
            events.append(f"stage {version}")
            if version == 1:
                staging.wait(5.0)
            return WeightsOffer(WeightManifest(version, [], [], 0), "shm", "", 1.0)

        def deliver(self):
            pass

    class Offers:
        async def send(self, offer):
            if offer.manifest.version == 1:
                await offering.wait()
            events.append(f"offer {offer.manifest.version}")

    out = bare_outlet(rank=0, sender=Sender(), offers=Offers())
    learner = RecordingLearner(events)

    async def scenario() -> None:
        first = await asyncio.to_thread(out.read, learner)
        await out.ship(first)
        learner.version = 2  # the next step trained
        second = asyncio.ensure_future(asyncio.to_thread(out.read, learner))
        await asyncio.sleep(0.1)
        assert not second.done() and events == ["gather 1", "stage 1"]  # version 1 not staged yet
        staging.set()
        second = await asyncio.wait_for(second, 2.0)  # its offer is still held up: no matter
        assert events == ["gather 1", "stage 1", "gather 2"]
        shipping = asyncio.ensure_future(out.ship(second))
        await asyncio.sleep(0.1)
        assert not shipping.done()  # offers go out in order: version 2 waits for version 1's
        offering.set()
        await shipping
        await out.shipped()
        assert second.watchdog.finished.is_set() and first.watchdog.finished.is_set()

    asyncio.run(scenario())
    assert events == ["gather 1", "stage 1", "gather 2", "offer 1", "stage 2", "offer 2"]
