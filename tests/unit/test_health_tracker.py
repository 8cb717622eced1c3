"""HealthTracker: silence past the timeout is reported; a replica whose newest heartbeat says
``starting`` gets ``starting_timeout`` instead; a forgotten replica is not reported."""

from schemas.messages import Heartbeat
from transport.heartbeat import HealthTracker


def test_silence_allowed_depends_on_the_newest_state():
    now = [0.0]
    h = HealthTracker(timeout=30.0, clock=lambda: now[0], starting_timeout=300.0)
    h.observe(Heartbeat("rollout", 0, 11, "starting"))
    h.observe(Heartbeat("reward", 0, 12, "running"))
    now[0] = 31.0
    assert h.silent() == ["reward/0"]
    now[0] = 299.0
    assert h.silent() == ["reward/0"]
    now[0] = 301.0
    assert h.silent() == ["reward/0", "rollout/0"]
    h.observe(Heartbeat("rollout", 0, 11, "running"))  # started: the short timeout again
    now[0] = 332.0
    assert h.silent() == ["reward/0", "rollout/0"]
    h.forget("reward/0")
    assert h.silent() == ["rollout/0"]


def test_starting_timeout_is_never_shorter_than_the_timeout():
    assert HealthTracker(timeout=60.0, starting_timeout=5.0).starting_timeout == 60.0
