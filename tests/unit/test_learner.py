"""Learner on FSDP2 (gloo, CPU): W=2 ≡ W=1, true no-op skips, exact resume, MoE, filtering."""

import tempfile
from pathlib import Path

import numpy as np
import torch

from schemas.messages import GroupFailed
from schemas.stack import LearnerSection
from stages.learner import checkpoint as ckpt
from stages.learner.trainer import Learner
from stages.model import build_model
from stages.testing import make_train_group, run_world

CFG = LearnerSection(lr=1e-2, micro_batch_tokens=256, weight_decay=0.1, warmup_steps=2)


def batch(step, n_groups=4):
    return [make_train_group(f"s{step}g{i}", n_samples=4, length=6 + (i + step) % 5, seed=100 * step + i)
            for i in range(n_groups)]


def params(learner):
    """Full parameters as numpy (tensors do not survive a spawned rank's exit)."""
    return {n: t.numpy().copy() for n, t in learner.full_parameters().items()}


def _train(run_dir, steps, model="tiny", cfg=CFG):
    learner = Learner(cfg, model_name=model, run_dir=Path(run_dir), max_staleness=2)
    losses = [learner.train_step(batch(s)).metrics["loss"] for s in range(steps)]
    return params(learner), losses


def test_two_ranks_equal_one_rank():
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        [p1] = [r[0] for r in run_world(_train, 1, d1, 2)]
        p2 = run_world(_train, 2, d2, 2)[0][0]
    assert p1.keys() == p2.keys()
    diff = max(float(np.abs(p1[k] - p2[k]).max()) for k in p1)
    assert diff <= 1e-5, diff


def _skip(run_dir):
    learner = Learner(CFG, model_name="tiny", run_dir=Path(run_dir), max_staleness=2)
    learner.train_step(batch(0))
    local = lambda: {n: p.to_local().clone() for n, p in learner.model.named_parameters()}  # noqa: E731
    before = local()
    opt_before = {k: (v["step"].clone(), v["exp_avg"].to_local().clone(), v["exp_avg_sq"].to_local().clone())
                  for k, v in learner.optimizer.state.items()}
    sched_before = learner.scheduler.state_dict()
    version = learner.version
    result = learner.train_step(batch(1), corrupt_grads=torch.distributed.get_rank() == 1)
    after = local()
    same_params = all(torch.equal(before[n], after[n]) for n in before)
    same_opt = all(torch.equal(a[0], v["step"]) and torch.equal(a[1], v["exp_avg"].to_local())
                   and torch.equal(a[2], v["exp_avg_sq"].to_local())
                   for a, v in zip(opt_before.values(), learner.optimizer.state.values()))
    ok_next = learner.train_step(batch(2))
    return (result.skipped, same_params, same_opt, sched_before == learner.scheduler.state_dict() or None,
            result.version == version, ok_next.skipped)


def test_nan_on_one_rank_skips_everywhere_as_a_true_no_op():
    with tempfile.TemporaryDirectory() as d:
        results = run_world(_skip, 2, d, timeout=180)
    for skipped, same_params, same_opt, _, same_version, next_skipped in results:
        assert skipped and same_params and same_opt and same_version
        assert not next_skipped  # training goes on afterwards


def _sched_after_skip(run_dir):
    learner = Learner(CFG, model_name="tiny", run_dir=Path(run_dir), max_staleness=2)
    before = learner.scheduler.state_dict()
    learner.train_step(batch(0), corrupt_grads=True)
    return before == learner.scheduler.state_dict(), learner.scheduler.get_last_lr()


def test_skip_leaves_lr_schedule_unchanged():
    with tempfile.TemporaryDirectory() as d:
        [(same, lr)] = run_world(_sched_after_skip, 1, d)
    assert same and lr == [CFG.lr / CFG.warmup_steps]


def _resume_run(run_dir, phase):
    learner = Learner(CFG, model_name="tiny", run_dir=Path(run_dir), max_staleness=2)
    if phase == "straight":
        for s in range(6):
            learner.train_step(batch(s))
    elif phase == "first":
        for s in range(3):
            learner.train_step(batch(s))
        learner.save_checkpoint()
        return None  # the process ends here: a crash loses everything not checkpointed
    else:
        assert learner.resume()
        assert learner.step == 3
        for s in range(3, 6):
            learner.train_step(batch(s))
    return params(learner), learner.version, sorted(learner.consumed)


def test_six_steps_equal_three_plus_crash_resume_three():
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        straight = run_world(_resume_run, 2, a, "straight")[0]
        run_world(_resume_run, 2, b, "first")
        resumed = run_world(_resume_run, 2, b, "second")[0]
    assert straight[1] == resumed[1] == 6 and straight[2] == resumed[2]
    for k in straight[0]:
        assert np.array_equal(straight[0][k], resumed[0][k]), k


def _incomplete(run_dir):
    learner = Learner(CFG, model_name="tiny", run_dir=Path(run_dir), max_staleness=2)
    learner.train_step(batch(0))
    first = learner.save_checkpoint()
    learner.train_step(batch(1))
    second = learner.save_checkpoint()
    if torch.distributed.get_rank() == 0:
        (second / ckpt.MARKER).unlink()  # as if the crash came before the marker
    torch.distributed.barrier()
    fresh = Learner(CFG, model_name="tiny", run_dir=Path(run_dir), max_staleness=2)
    fresh.resume()
    return ckpt.latest_complete(Path(run_dir) / "checkpoints") == first, fresh.step


def test_checkpoint_without_marker_is_ignored():
    with tempfile.TemporaryDirectory() as d:
        [(picked_first, step)] = run_world(_incomplete, 1, d)
    assert picked_first and step == 1


def _meta_init():
    learner = Learner(CFG, model_name="tiny", run_dir=Path(tempfile.mkdtemp()), max_staleness=2)
    got = params(learner)
    ref = build_model("tiny", seed=0)
    same = all(np.array_equal(got[n], p.detach().numpy()) for n, p in ref.named_parameters()) if got else True
    rot = [m for m in learner.model.modules() if hasattr(m, "inv_freq")][0]
    ref_rot = [m for m in ref.modules() if hasattr(m, "inv_freq")][0]
    return same, torch.equal(rot.inv_freq.cpu(), ref_rot.inv_freq)


def test_meta_init_and_broadcast_equal_a_normal_load():
    for same, rotary in run_world(_meta_init, 2):
        assert same and rotary


def _moe():
    cfg = LearnerSection(lr=1e-3, micro_batch_tokens=128, activation_checkpointing=True)
    learner = Learner(cfg, model_name="tiny-moe", run_dir=Path(tempfile.mkdtemp()), max_staleness=2)
    out = [learner.train_step(batch(s)) for s in range(3)]
    return [(r.metrics["loss"], r.metrics["aux_loss"], r.skipped) for r in out]


def test_moe_trains_three_steps_with_activation_checkpointing():
    for loss, aux, skipped in run_world(_moe, 2)[0]:
        assert np.isfinite(loss) and aux > 0 and not skipped


def _filter():
    learner = Learner(CFG, model_name="tiny", run_dir=Path(tempfile.mkdtemp()), max_staleness=1)
    learner.version = 3
    fresh = make_train_group("a", version=3)
    old_ok = make_train_group("b", version=2)
    stale = make_train_group("c", version=1)
    keep, dropped = learner.admit([fresh, old_ok, stale, make_train_group("a", version=3),
                                   GroupFailed("d", "reward crashed", "reward/0")])
    learner.train_step(keep)
    keep2, dropped2 = learner.admit([make_train_group("b", version=3), make_train_group("c", version=3),
                                     GroupFailed("a", "late failure", "logprob/0")])
    return ([g.scored.rollout.group.group_id for g in keep], [(d.group_id, d.reason) for d in dropped],
            keep2, [(d.group_id, d.reason) for d in dropped2], learner.dropped_counts)


def test_duplicate_and_stale_groups_are_dropped_and_counted():
    keep, dropped, keep2, dropped2, counts = run_world(_filter, 1)[0]
    assert keep == ["a", "b"]
    assert dropped == [("c", "stale"), ("a", "duplicate"), ("d", "failed: reward crashed")]
    # A fresh copy of a group dropped as stale is a duplicate, not trained: one terminal state.
    assert keep2 == [] and dropped2 == [("b", "duplicate"), ("c", "duplicate")]
    assert counts == {"duplicate": 3, "stale": 1, "failed": 1}
