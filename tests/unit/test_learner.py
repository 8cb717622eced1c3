"""Learner on FSDP2 (gloo, CPU): W=2 ≡ W=1, true no-op skips, exact resume, meta init, MoE
with activation checkpointing, admission (duplicates, staleness, failures).

Spawning a rank costs seconds of imports on a 2-core CI machine, so the multi-rank checks
share two spawned 2-rank worlds (module-scoped fixtures) and the single-rank checks run
in this process on a 1-rank gloo group.
"""

import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
import torch.distributed as dist

from pipeline.endpoints import free_port
from schemas.messages import GroupFailed
from stages.learner import checkpoint as ckpt
from stages.learner.config import LearnerConfig
from stages.learner.fsdp import build_inference
from stages.learner.trainer import CONSUMED_FILE, Learner
from stages.model import build_model
from stages.testing import make_train_group, run_world

CFG = LearnerConfig(lr=1e-2, micro_batch_tokens=256, weight_decay=0.1, warmup_steps=2, max_staleness=2)
ASYNC_CFG = msgspec.structs.replace(CFG, async_checkpoint=True)
RANK_THREADS = 1
"""Two ranks on two shared cores: one compute thread each avoids oversubscription."""


def batch(step, n_groups=4):
    return [make_train_group(f"s{step}g{i}", n_samples=4, length=6 + (i + step) % 5, seed=100 * step + i)
            for i in range(n_groups)]


def params(learner):
    """Full parameters as numpy (tensors do not survive a spawned rank's exit)."""
    return {n: t.numpy().copy() for n, t in learner.full_state_dict().items()}


def local_state(learner):
    """This rank's parameter shards, AdamW moments and step counts, scheduler state (copies)."""
    shards = {n: p.to_local().clone() for n, p in learner.model.named_parameters()}
    opt = [(v["step"].clone(), v["exp_avg"].to_local().clone(), v["exp_avg_sq"].to_local().clone())
           for v in learner.optimizer.state.values()]
    return shards, opt, learner.scheduler.state_dict(), learner.version


def same_state(a, b):
    return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
            and len(a[1]) == len(b[1]) and all(torch.equal(x, y) for s, t in zip(a[1], b[1]) for x, y in zip(s, t))
            and a[2] == b[2] and a[3] == b[3])


def _first_world(run_dir):
    """Rank body: meta-init check, 2 steps (vs W=1), checkpoint at 3, 6 steps, NaN skip."""
    torch.set_num_threads(RANK_THREADS)
    learner = Learner(CFG, run_dir=run_dir)
    out = {"init": params(learner)}
    rot = [m for m in learner.model.modules() if hasattr(m, "inv_freq")][0]
    out["inv_freq"] = rot.inv_freq.cpu().numpy().copy()
    for s in range(6):
        learner.train_step(batch(s))
        if s == 1:
            out["after_2"] = params(learner)
        if s == 2:
            learner.save_checkpoint()  # reads state only: the straight run goes on unchanged
            out["after_3"] = params(learner)
    # The same 3 steps with a background checkpoint after them, then a 4th step while its
    # write may still run: the checkpoint must hold the state of step 3.
    background = Learner(ASYNC_CFG, run_dir=str(Path(run_dir) / "async"))
    for s in range(3):
        background.train_step(batch(s))
    assert background.save_checkpoint(wait=False) is None and background.checkpoint_step == -1
    background.train_step(batch(3))
    background.finish_checkpoint()
    assert background.checkpoint_step == 3
    out["after_6"], out["version_6"], out["consumed_6"] = params(learner), learner.version, sorted(learner.consumed)
    before = local_state(learner)
    skipped = learner.train_step(batch(6), corrupt_grads=dist.get_rank() == 1)
    out["skip"] = (skipped.skipped, skipped.metrics["skipped"], same_state(before, local_state(learner)))
    out["after_skip_step"] = learner.train_step(batch(7)).skipped
    return out


def _second_world(run_dir):
    """Rank body: a fresh process resumes the step-3 checkpoint and trains 3 steps; then
    the MoE model trains 3 steps with activation checkpointing."""
    torch.set_num_threads(RANK_THREADS)
    learner = Learner(CFG, run_dir=run_dir)
    assert learner.resume() and learner.step == 3 and learner.version == 3
    for s in range(3, 6):
        learner.train_step(batch(s))
    out = {"after_6": params(learner), "version_6": learner.version, "consumed_6": sorted(learner.consumed)}
    background = Learner(ASYNC_CFG, run_dir=str(Path(run_dir) / "async"))
    assert background.resume() and background.step == 3 and background.version == 3
    out["async_resumed"] = params(background)
    moe_cfg = LearnerConfig(model="tiny-moe", lr=1e-3, micro_batch_tokens=128, activation_checkpointing=True,
                            run_dir=str(Path(run_dir) / "moe"))
    moe = Learner(moe_cfg)
    out["moe"] = [(r.metrics["loss"], r.metrics["aux_loss"], r.skipped)
                  for r in (moe.train_step(batch(s)) for s in range(3))]
    return out


@pytest.fixture(scope="module")
def worlds():
    with tempfile.TemporaryDirectory() as d:
        first = run_world(_first_world, 2, d, timeout=240)
        second = run_world(_second_world, 2, d, timeout=240)
        yield first, second


@pytest.fixture(scope="module")
def one_rank():
    """A 1-rank gloo group in this process (torn down after the module)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_two_ranks_equal_one_rank(worlds, one_rank, tmp_path):
    # The ranks ran RANK_THREADS compute threads; so does this one: a CPU matmul's reduction
    # order (the LM head's weight gradient sums over tokens) depends on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(RANK_THREADS)
    try:
        learner = Learner(CFG, run_dir=tmp_path)
        for s in range(2):
            learner.train_step(batch(s))
    finally:
        torch.set_num_threads(threads)
    p1, p2 = params(learner), worlds[0][0]["after_2"]
    assert p1.keys() == p2.keys()
    diff = max(float(np.abs(p1[k] - p2[k]).max()) for k in p1)
    assert diff <= 1e-5, diff


def test_meta_init_and_broadcast_equal_a_normal_load(worlds):
    ref = build_model("tiny", seed=0)
    got = worlds[0][0]["init"]
    assert got.keys() == dict(ref.named_parameters()).keys()
    for n, p in ref.named_parameters():
        assert np.array_equal(got[n], p.detach().numpy()), n
    ref_rot = [m for m in ref.modules() if hasattr(m, "inv_freq")][0]
    for rank_out in worlds[0]:  # non-persistent rotary buffers restored on every rank
        assert np.array_equal(rank_out["inv_freq"], ref_rot.inv_freq.numpy())


def test_nan_on_one_rank_skips_everywhere_as_a_true_no_op(worlds):
    for rank_out in worlds[0]:
        skipped, flagged, unchanged = rank_out["skip"]
        assert skipped and flagged == 1.0
        assert unchanged, "params, AdamW moments/steps, scheduler or version moved on a skipped step"
        assert rank_out["after_skip_step"] is False  # training goes on afterwards


def test_six_steps_equal_three_plus_crash_resume_three(worlds):
    straight, resumed = worlds[0][0], worlds[1][0]
    assert straight["version_6"] == resumed["version_6"] == 6
    assert straight["consumed_6"] == resumed["consumed_6"]
    for k in straight["after_6"]:
        assert np.array_equal(straight["after_6"][k], resumed["after_6"][k]), k


def test_moe_trains_three_steps_with_activation_checkpointing(worlds):
    for rank_out in worlds[1]:
        for loss, aux, skipped in rank_out["moe"]:
            assert np.isfinite(loss) and aux > 0 and not skipped


def test_skip_leaves_lr_schedule_unchanged(one_rank, tmp_path):
    learner = Learner(CFG, run_dir=tmp_path)
    before = learner.scheduler.state_dict()
    result = learner.train_step(batch(0), corrupt_grads=True)
    assert result.skipped and result.version == 0 and result.step == 1
    assert before == learner.scheduler.state_dict() and learner.scheduler.get_last_lr() == [CFG.lr / CFG.warmup_steps]
    assert not learner.optimizer.state  # AdamW never stepped: no moments, no step count


def test_two_ranks_resume_a_background_checkpoint_at_the_state_it_was_taken(worlds):
    first, second = worlds
    for name, arr in first[0]["after_3"].items():  # rank 0 holds the full parameters
        np.testing.assert_array_equal(second[0]["async_resumed"][name], arr)


def started_late(fn, seconds: float = 0.5):
    """``fn``, starting ``seconds`` late: a background save's phase then still runs when the
    next step comes."""
    def late(*a, **kw):
        time.sleep(seconds)
        return fn(*a, **kw)
    return late


def assert_resumes_at(run_dir, step: int, snapshot: dict) -> None:
    """A fresh learner resumes ``run_dir``'s newest checkpoint at ``step`` with ``snapshot``'s weights."""
    fresh = Learner(ASYNC_CFG, run_dir=run_dir)
    assert fresh.resume() and fresh.step == step
    for name, arr in snapshot.items():
        np.testing.assert_array_equal(params(fresh)[name], arr)


def test_background_checkpoint_counts_only_once_written(one_rank, tmp_path, monkeypatch):
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    # the write starts only after the next step changed the weights
    monkeypatch.setattr(FileSystemWriter, "write_data", started_late(FileSystemWriter.write_data))
    learner = Learner(ASYNC_CFG, run_dir=tmp_path)
    learner.train_step(batch(0))
    snapshot = params(learner)
    assert not learner.checkpoint_busy()
    assert learner.save_checkpoint(wait=False) is None
    assert learner.checkpoint_step == -1  # not on disk yet as far as anyone may rely on
    assert learner.checkpoint_busy()  # still writing: the stage defers the next periodic save
    learner.train_step(batch(1))  # changes the parameters while the write may still run
    path = learner.finish_checkpoint()
    assert (path / ckpt.MARKER).exists() and learner.checkpoint_step == 1 and not learner.checkpoint_busy()
    assert learner.finish_checkpoint() is None and not learner.checkpoint_written()
    assert_resumes_at(tmp_path, 1, snapshot)
    # A waited save (the drain's) is complete on return; it finished the one before first.
    learner.save_checkpoint(wait=False)
    learner.train_step(batch(2))
    done = learner.save_checkpoint()
    assert done.name == "step-000003" and learner.checkpoint_step == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]


def test_step_after_a_background_save_waits_until_the_state_is_copied_out(one_rank, tmp_path, monkeypatch):
    from torch.distributed.checkpoint.staging import StateDictStager

    # the copy to host memory starts late, in its thread
    monkeypatch.setattr(StateDictStager, "stage", started_late(StateDictStager.stage))
    learner = Learner(ASYNC_CFG, run_dir=tmp_path)
    learner.train_step(batch(0))
    snapshot = params(learner)
    learner.save_checkpoint(wait=False)
    assert not learner._pending_save.staged.done()  # still copying when the next step starts
    learner.train_step(batch(1))  # may not change the weights before the copy is taken
    assert learner.finish_checkpoint().name == "step-000001"
    assert_resumes_at(tmp_path, 1, snapshot)


def test_background_saves_survive_a_stager_that_closes_its_copier_after_each_stage(one_rank, tmp_path, monkeypatch):
    """torch 2.11's ``DefaultStager`` closes its state-dict copier after every stage; a plain
    copier then fails the next save on the learner's state (``KeyError: <class 'type'>``:
    its dispatch table was emptied), as the second background save on an H200 did."""
    from torch.distributed.checkpoint.staging import DefaultStager

    stage = DefaultStager._stage

    def stage_then_close(self, state_dict, **kwargs):
        staged = stage(self, state_dict, **kwargs)
        self._state_dict_stager.close()
        return staged

    monkeypatch.setattr(DefaultStager, "_stage", stage_then_close)
    learner = Learner(ASYNC_CFG, run_dir=tmp_path)
    for s in range(3):
        learner.train_step(batch(s))
        snapshot = params(learner)
        learner.save_checkpoint(wait=False)
        assert learner.finish_checkpoint().name == f"step-{s + 1:06d}"
    assert_resumes_at(tmp_path, 3, snapshot)


def test_checkpoint_without_marker_is_ignored(one_rank, tmp_path):
    learner = Learner(CFG, run_dir=tmp_path)
    learner.train_step(batch(0))
    first = learner.save_checkpoint()
    learner.train_step(batch(1))
    second = learner.save_checkpoint()
    (second / ckpt.MARKER).unlink()  # as if the crash came before the marker
    fresh = Learner(CFG, run_dir=tmp_path)
    assert fresh.resume()
    assert ckpt.latest_complete(tmp_path / "checkpoints") == first and fresh.step == 1
    assert fresh.consumed == {g.scored.rollout.group.group_id for g in batch(0)}
    assert '"resumed": 1' in (tmp_path / CONSUMED_FILE).read_text().splitlines()[-1]


def test_keep_last_prunes_old_complete_checkpoints(one_rank, tmp_path):
    learner = Learner(CFG, run_dir=tmp_path, max_staleness=2)
    for s in range(4):
        learner.train_step(batch(s))
        learner.save_checkpoint()
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-000003", "step-000004"]  # CFG.keep_last == 2


def test_duplicate_and_stale_groups_are_dropped_and_counted(one_rank, tmp_path):
    learner = Learner(CFG, run_dir=tmp_path, max_staleness=1)
    learner.version = 3
    fresh = make_train_group("a", version=3)
    old_ok = make_train_group("b", version=2)
    stale = make_train_group("c", version=1)
    keep, dropped = learner.admit([fresh, old_ok, stale, make_train_group("a", version=3),
                                   GroupFailed("d", "reward crashed", "reward/0")])
    assert [g.scored.rollout.group.group_id for g in keep] == ["a", "b"]
    assert [(d.group_id, d.reason) for d in dropped] == [("c", "stale"), ("a", "duplicate"),
                                                         ("d", "failed: reward crashed")]
    result = learner.train_step(keep)
    progress = result.progress()
    assert progress.consumed_ids == ["a", "b"] and progress.version == result.version == 4
    # Already trained, a fresh copy of a group dropped as stale, a late failure of a trained
    # one: each group has exactly one terminal state, so all are duplicates (a failure notice
    # is answered too: the source resends it until it hears back).
    keep2, dropped2 = learner.admit([make_train_group("b", version=3), make_train_group("c", version=3),
                                     GroupFailed("a", "late failure", "logprob/0")])
    assert keep2 == [] and [(d.group_id, d.reason) for d in dropped2] == [
        ("b", "duplicate"), ("c", "duplicate"), ("a", "duplicate")]
    assert learner.dropped_counts == {"duplicate": 4, "stale": 1, "failed": 1, "invalid": 0}
    broken = make_train_group("e", version=3)
    broken.scored.rollout.samples[1].logprobs = broken.scored.rollout.samples[1].logprobs[:-1]
    keep3, dropped3 = learner.admit([broken])
    assert keep3 == [] and [(d.group_id, d.reason) for d in dropped3] == [
        ("e", "invalid: sample 1: 15 logprobs for 16 tokens")]
    assert learner.dropped_counts["invalid"] == 1
    assert '"consumed": ["a", "b"]' in (tmp_path / CONSUMED_FILE).read_text()


def test_step_metrics_report_mismatch_and_importance_weights(one_rank, tmp_path):
    learner = Learner(CFG, run_dir=tmp_path)
    m = learner.train_step(batch(0)).metrics
    assert m["tokens"] == sum(len(s.token_ids) for g in batch(0) for s in g.scored.rollout.samples)
    assert m["logprob_gap_mean"] > 0 and m["logprob_gap_max"] >= m["logprob_gap_mean"]
    assert 0 < m["is_weight_min"] <= m["is_weight_mean"] <= m["is_weight_max"]
    assert 0 <= m["is_truncated_frac"] <= 1 and np.isfinite(m["grad_norm"]) and m["skipped"] == 0


def test_inference_only_variant_scores_like_the_plain_model(one_rank):
    model = build_inference("tiny", device=torch.device("cpu"), seed=0)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    ids = torch.from_numpy(np.concatenate([make_train_group("g", seed=5).scored.rollout.group.prompt_ids,
                                           make_train_group("g", seed=5).scored.rollout.samples[0].token_ids]))
    with torch.no_grad():  # not inference_mode: FSDP2's unshard needs version counters
        got = model(input_ids=ids[None].long()).logits
        want = build_model("tiny", seed=0)(input_ids=ids[None].long()).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _sequence_logprobs(learner, group):
    """Trainer log-probability of each completion of ``group`` (no grad; 1-rank model)."""
    prompt = group.scored.rollout.group.prompt_ids
    out = []
    with torch.no_grad():
        for s in group.scored.rollout.samples:
            ids = torch.from_numpy(np.concatenate([prompt, s.token_ids]).astype(np.int64))[None]
            logp = torch.log_softmax(learner.model(input_ids=ids).logits[0, :-1].float(), -1)
            out.append(logp[len(prompt) - 1:].gather(-1, ids[0, len(prompt):, None])[:, 0].numpy())
    return out


@pytest.mark.parametrize("loss", ["grpo", "ppo"])
def test_a_step_moves_probability_toward_the_rewarded_sample(one_rank, tmp_path, loss):
    learner = Learner(msgspec.structs.replace(CFG, loss=loss, warmup_steps=0, weight_decay=0.0), run_dir=tmp_path)
    group = make_train_group("g", n_samples=2, length=8, seed=3, rewards=np.array([1.0, 0.0], np.float32))
    before = _sequence_logprobs(learner, group)
    for sample, logp in zip(group.scored.rollout.samples, before):  # on-policy: importance weight 1
        sample.logprobs = logp.astype(np.float32)
    result = learner.train_step([group])
    after = _sequence_logprobs(learner, group)
    assert result.metrics["logprob_gap_max"] < 1e-4 and result.metrics["is_weight_mean"] == pytest.approx(1, abs=1e-4)
    assert after[0].sum() > before[0].sum() and after[1].sum() < before[1].sum()


def test_a_resumed_learner_refuses_every_id_that_reached_a_terminal_state(one_rank, tmp_path):
    learner = Learner(CFG, run_dir=tmp_path, max_staleness=0)
    trained = batch(0)
    keep, _ = learner.admit(trained)
    learner.train_step(keep)  # version 1
    _, dropped = learner.admit([make_train_group("old", version=0), GroupFailed("bad", "timeout", "reward/0")])
    assert [d.reason for d in dropped] == ["stale", "failed: timeout"]
    learner.save_checkpoint()
    del learner  # the crash: only the checkpoint survives
    fresh = Learner(CFG, run_dir=tmp_path, max_staleness=0)
    assert fresh.resume() and fresh.version == 1
    copies = [trained[0], make_train_group("old", version=1), make_train_group("bad", version=1),
              make_train_group("new", version=1)]
    keep, dropped = fresh.admit(copies)
    assert [g.scored.rollout.group.group_id for g in keep] == ["new"]
    assert [(d.group_id, d.reason) for d in dropped] == [(trained[0].scored.rollout.group.group_id, "duplicate"),
                                                         ("old", "duplicate"), ("bad", "duplicate")]


def test_leaving_out_zero_advantage_samples_changes_nothing_but_the_work(one_rank, tmp_path, monkeypatch):
    import stages.learner.trainer as trainer_module

    def mixed_batch(step):  # half the groups scored alike (every advantage exactly 0)
        return [make_train_group(f"z{step}g{i}", n_samples=4, length=6 + i, seed=10 * step + i,
                                 rewards=np.full(4, 0.5, np.float32) if i % 2 else None) for i in range(4)]

    skipping = Learner(CFG, run_dir=tmp_path / "a")
    got = [skipping.train_step(mixed_batch(s)).metrics for s in range(2)]
    real = trainer_module.rank_micro_batches
    monkeypatch.setattr(trainer_module, "rank_micro_batches",
                        lambda *a, **kw: real(*a, **dict(kw, skip_zero_advantage=False)))
    full = Learner(CFG, run_dir=tmp_path / "b")
    want = [full.train_step(mixed_batch(s)).metrics for s in range(2)]
    a, b = params(skipping), params(full)
    # Only float summation order differs (other padding, other packing); Adam divides by
    # sqrt(v), which lifts rounding-level differences of near-zero gradients to ~1e-5.
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-4
    assert [m["grad_norm"] for m in got] == pytest.approx([m["grad_norm"] for m in want], rel=1e-5)
    assert got[0]["zero_adv_frac"] == 0.5 and got[0]["tokens"] < want[0]["tokens"]  # half the work


def test_every_parameter_read_gives_the_host_state_dict_and_shares_no_storage(one_rank, tmp_path):
    """Three ways to read the full parameters: the host state dict (``host_full_parameters``,
    ``shm`` on several ranks), the gather where the shards live (``gather_full_parameters``,
    ``cuda_ipc``/``nccl``) and the one-rank copy of the local tensors (``one_rank_parameters``,
    what ``full_parameters`` takes here). Run on CPU they must give the same bytes."""
    from stages.learner.fsdp import (full_parameters, gather_full_parameters, host_full_parameters,
                                     one_rank_parameters)

    learner = Learner(CFG, run_dir=tmp_path, max_staleness=1)
    learner.train_step([make_train_group("a", version=0)])
    host = host_full_parameters(learner.model, torch.bfloat16)
    assert list(host) == [n for n, _ in learner.model.named_parameters()]
    for other in (gather_full_parameters(learner.model, torch.bfloat16, "cpu"),
                  one_rank_parameters(learner.model, torch.bfloat16, None),
                  full_parameters(learner.model, torch.bfloat16)):
        assert list(other) == list(host)
        for name, t in other.items():
            assert t.dtype == torch.bfloat16 and torch.equal(t, host[name]), name
    params = dict(learner.model.named_parameters())
    # No path hands out the model's own storage, even where no cast or gather copies
    # (fp32, one rank): the publisher stages them while the next step changes the model.
    for fp32 in (gather_full_parameters(learner.model, torch.float32, "cpu"),
                 host_full_parameters(learner.model, torch.float32),
                 one_rank_parameters(learner.model, torch.float32, None)):
        for name, t in fp32.items():
            local = params[name].to_local() if hasattr(params[name], "to_local") else params[name]
            assert t.untyped_storage().data_ptr() != local.untyped_storage().data_ptr(), name
            assert torch.equal(t, local.detach()), name


def test_staleness_is_reported_per_sample_as_a_distribution(one_rank, tmp_path):
    """Lag of a sample = learner version at train time − the oldest version among its tokens."""
    learner = Learner(CFG, run_dir=tmp_path, max_staleness=2)
    learner.version = 3
    g = make_train_group("mixed", n_samples=4, version=3)
    spans = [[[0, 3]], [[0, 2], [4, 3]], [[0, 1], [2, 2], [5, 3]], [[0, 3]]]
    for s, sp in zip(g.scored.rollout.samples, spans):
        s.version_spans = np.array(sp, np.int32)
    keep, dropped = learner.admit([g])
    assert len(keep) == 1 and not dropped  # the group's lag is its oldest sample's: 2
    m = learner.train_step(keep).metrics
    assert (m["staleness_frac_0"], m["staleness_frac_1"], m["staleness_frac_2"]) == (0.5, 0.25, 0.25)
    assert m["staleness_mean"] == 0.75 and m["staleness_max"] == 2.0


def test_compiled_layers_train_like_eager_layers(one_rank, tmp_path):
    eager = Learner(CFG, run_dir=tmp_path / "eager")
    compiled = Learner(msgspec.structs.replace(CFG, compile_layers=True), run_dir=tmp_path / "compiled")
    for s in range(2):
        a, b = eager.train_step(batch(s)).metrics, compiled.train_step(batch(s)).metrics
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
    pa, pb = params(eager), params(compiled)
    assert pa.keys() == pb.keys()  # compiled in place: state-dict names unchanged
    # Rounding only: eager CPU linears run on oneDNN, compiled ones on inductor's kernels,
    # and AdamW turns a rounding-sized gradient into an update of up to ~lr (1e-2 here) for
    # components whose gradient is near zero; 2 steps of that stay far below it.
    assert max(float(np.abs(pa[k] - pb[k]).max()) for k in pa) <= 1e-3
