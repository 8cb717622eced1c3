"""Learner pure logic: GRPO advantages, PPO clip and dual clip, TIS cap, KL, metrics,
micro-batch packing and aggregation weights, config validation. No process group."""

import numpy as np
import pytest
import torch

from schemas.stack import LearnerSection
from schemas.messages import Rollout, ScoredGroup, TrainGroup
from stages.learner.batch import SHARED_ROW_TOKENS, pack, rank_micro_batches, rows, step_items
from stages.learner.head import logprob_head
from stages.model import build_model
from stages.learner.config import LearnerConfig
from stages.learner.loss import grpo_advantages, policy_loss
from stages.testing import make_prompt_group, make_sample, make_train_group


def test_grpo_advantages_are_group_normalised():
    adv = grpo_advantages(np.array([1.0, 0.0, 0.0, 1.0], np.float32))
    np.testing.assert_allclose(adv, [1, -1, -1, 1], atol=1e-5)
    assert adv.dtype == np.float32
    assert np.all(grpo_advantages(np.full(5, 0.7)) == 0)  # equal rewards: no signal, no NaN
    assert grpo_advantages(np.zeros(0)).shape == (0,)


def _grad(kind, logp_value, behaviour, adv, **kw):
    logp = torch.tensor([logp_value], requires_grad=True)
    loss, met = policy_loss(logp, torch.tensor([behaviour]), torch.tensor([adv]), torch.ones(1), kind=kind, **kw)
    loss.backward()
    return float(loss.detach()), float(logp.grad), met


def test_grpo_weight_is_truncated_at_the_cap():
    # π/μ = e^1 ≈ 2.72 > cap 2: value and gradient scale by 2, the token counts as truncated.
    loss, grad, met = _grad("grpo", -1.0, -2.0, 1.0, tis_cap=2.0)
    assert loss == pytest.approx(-2.0) and grad == pytest.approx(-2.0)
    assert float(met["is_truncated_tokens"]) == 1 and float(met["is_weight_max"]) == pytest.approx(np.e)
    # Below the cap the full ratio weights the gradient.
    loss, grad, met = _grad("grpo", -1.0, -1.5, 1.0, tis_cap=2.0)
    assert grad == pytest.approx(-np.exp(0.5), rel=1e-6) and float(met["is_truncated_tokens"]) == 0
    assert float(met["logprob_gap_abs_sum"]) == pytest.approx(0.5)


def test_ppo_clips_the_ratio_asymmetrically():
    # A > 0, r = e^0.5 ≈ 1.65 > 1 + 0.28: clipped, no gradient.
    loss, grad, met = _grad("ppo", -1.0, -1.5, 1.0, clip_eps_low=0.2, clip_eps_high=0.28, tis_cap=3.0)
    assert loss == pytest.approx(-1.28) and grad == 0 and float(met["clipped_tokens"]) == 1
    # A > 0, r = e^0.2 ≈ 1.22 < 1.28: inside the clip-higher range, gradient r·A.
    loss, grad, met = _grad("ppo", -1.0, -1.2, 1.0, clip_eps_low=0.2, clip_eps_high=0.28, tis_cap=3.0)
    assert grad == pytest.approx(-np.exp(0.2), rel=1e-6) and float(met["clipped_tokens"]) == 0
    # A < 0, r = e^-0.5 ≈ 0.61 < 1 - 0.2: clipped at 0.8.
    loss, grad, _ = _grad("ppo", -1.5, -1.0, -1.0, clip_eps_low=0.2, clip_eps_high=0.28, tis_cap=3.0)
    assert loss == pytest.approx(0.8) and grad == 0


def test_ppo_dual_clip_caps_negative_advantage_tokens_at_tis_cap():
    # A < 0, r = e^2 ≈ 7.4 > cap 3: loss bounded by -C·A = 3, no gradient, counted as truncated.
    loss, grad, met = _grad("ppo", -1.0, -3.0, -1.0, tis_cap=3.0)
    assert loss == pytest.approx(3.0) and grad == 0 and float(met["is_truncated_tokens"]) == 1
    # A < 0, r = e^0.5 below the cap: the unclipped r·A term (larger loss) wins, with gradient.
    loss, grad, met = _grad("ppo", -1.0, -1.5, -1.0, tis_cap=3.0)
    assert loss == pytest.approx(np.exp(0.5), rel=1e-6) and grad == pytest.approx(np.exp(0.5), rel=1e-6)


def test_k3_kl_is_zero_at_the_reference_and_positive_away_from_it():
    logp = torch.tensor([-1.0, -2.0])
    common = dict(kind="grpo", tis_cap=2.0, kl_coef=0.5)
    _, met = policy_loss(logp, logp, torch.zeros(2), torch.ones(2), ref_logp=logp.clone(), **common)
    assert float(met["kl_sum"]) == 0
    _, met = policy_loss(logp, logp, torch.zeros(2), torch.ones(2), ref_logp=logp - 0.5, **common)
    assert float(met["kl_sum"]) == pytest.approx(2 * (np.exp(-0.5) + 0.5 - 1), rel=1e-6)


def test_zero_weight_tokens_count_for_nothing():
    logp = torch.tensor([-1.0, -1.0])
    loss, met = policy_loss(logp, torch.tensor([-1.0, -9.0]), torch.ones(2), torch.tensor([0.5, 0.0]), kind="grpo")
    assert float(met["tokens"]) == 1 and float(met["is_weight_max"]) == 1 and float(loss) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="unknown loss"):
        policy_loss(logp, logp, torch.ones(2), torch.ones(2), kind="reinforce")


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_step_weights_sum_to_one_over_any_packing_and_world(aggregation):
    groups = [make_train_group(f"g{i}", n_samples=3, length=4 + 3 * i, seed=i) for i in range(4)]
    items = step_items(groups, aggregation)
    for budget in (16, 64, 10_000):
        for world in (1, 2, 3):
            mbs = [mb for r in range(world) for mb in rank_micro_batches(
                groups, aggregation=aggregation, budget=budget, rank=r, world=world, device=torch.device("cpu"))]
            assert float(sum(mb.weight.sum() for mb in mbs)) == pytest.approx(1.0, rel=1e-5)
            assert int(sum((mb.weight > 0).sum() for mb in mbs)) == sum(len(it.behaviour) for it in items)
    if aggregation == "seq_mean":  # each sequence weighs the same whatever its length
        assert {round(it.weight * len(it.behaviour), 9) for it in items} == {round(1 / len(items), 9)}


def test_loss_mask_covers_completion_tokens_only_and_budget_is_respected():
    g = make_train_group("g", n_samples=2, length=5, seed=1)
    prompt_len = len(g.scored.rollout.group.prompt_ids)
    samples = g.scored.rollout.samples
    cpu = torch.device("cpu")
    # A row per sequence (the plain layout): each row's completion-predicting positions p-1 .. p-2+t.
    [mb] = rank_micro_batches([g], aggregation="token_mean", budget=1000, rank=0, world=1, device=cpu,
                              shared_row_tokens=0)
    width = mb.input_ids.shape[1]
    assert (mb.weight > 0).all() and len(mb.index) == sum(len(s.token_ids) for s in samples)
    want = np.concatenate([r * width + np.arange(prompt_len - 1, prompt_len - 1 + len(s.token_ids))
                           for r, s in enumerate(samples)])
    np.testing.assert_array_equal(mb.index.numpy(), want)
    # The target at each position is the next input token, the completion's own token; the
    # behaviour logprob is the engine's.
    np.testing.assert_array_equal(mb.targets.numpy(), mb.input_ids.reshape(-1)[mb.index + 1].numpy())
    np.testing.assert_array_equal(mb.targets.numpy(), np.concatenate([s.token_ids for s in samples]))
    np.testing.assert_array_equal(mb.behaviour.numpy(), np.concatenate([s.logprobs for s in samples]))
    assert mb.attention_mask.shape == mb.input_ids.shape and mb.position_ids is None
    # Shared (the default): one row, prompt + c1 + c2; the prompt's last position predicts
    # both completions' first tokens, positions restart after the prompt for c2.
    [mb] = rank_micro_batches([g], aggregation="token_mean", budget=1000, rank=0, world=1, device=cpu)
    p, t = prompt_len, 5
    assert mb.input_ids.shape == (1, p + 2 * t) and mb.attention_mask.shape == (1, 1, p + 2 * t, p + 2 * t)
    np.testing.assert_array_equal(mb.index.numpy(), [*range(p - 1, p + t - 1), p - 1, *range(p + t, p + 2 * t - 1)])
    np.testing.assert_array_equal(mb.position_ids[0].numpy(), [*range(p + t), *range(p, p + t)])
    np.testing.assert_array_equal(mb.targets.numpy(), np.concatenate([s.token_ids for s in samples]))
    m = mb.attention_mask[0, 0].numpy()
    assert m[p + t, :p].all() and not m[p + t, p:p + t].any() and m[p + t, p + t]  # c2 sees the prompt, not c1
    [idle] = rank_micro_batches([g], aggregation="token_mean", budget=1000, rank=1, world=2,
                                device=torch.device("cpu"))
    assert idle.weight.tolist() == [0.0] and len(idle.index) == 1  # an idle rank still runs a pass
    items = step_items([make_train_group(f"g{i}", n_samples=4, length=10, seed=i) for i in range(3)], "token_mean")
    for budget in (40, 100):
        for batch in pack(rows(items, 40), budget):
            assert len(batch) * max(len(row) for row in batch) <= budget or len(batch) == 1


def _ragged_group(gid: str, lengths: list[int], seed: int, prompt_len: int) -> TrainGroup:
    group = make_prompt_group(gid, prompt_len, len(lengths), seed=seed)
    samples = [make_sample(n, seed=seed * 100 + i) for i, n in enumerate(lengths)]
    rewards = np.random.default_rng(seed).random(len(lengths), dtype=np.float32)
    return TrainGroup(ScoredGroup(Rollout(group, samples, "rollout/0"), rewards), None)


def test_shared_prompt_rows_give_the_plain_layouts_logprobs_and_gradients():
    """Completions packed behind one copy of their prompt (position ids continuing from the
    prompt, a mask that hides the other completions) see exactly what they see alone."""
    groups = [_ragged_group("a", [4, 1, 7, 3, 5], 1, 3), _ragged_group("b", [2, 6, 6], 2, 9),
              _ragged_group("c", [9], 3, 5)]
    model = build_model("tiny", seed=4)
    model.requires_grad_(True)
    got = {}
    for share in (0, 16, 512):  # a row per sequence; rows of a few; whole groups
        mbs = rank_micro_batches(groups, aggregation="token_mean", budget=10_000, rank=0, world=1,
                                 device=torch.device("cpu"), shared_row_tokens=share)
        model.zero_grad()
        order, logps = [], []
        for mb in mbs:
            extra = {} if mb.position_ids is None else {"position_ids": mb.position_ids}
            assert (mb.position_ids is None) == (mb.attention_mask.dim() == 2)
            with logprob_head(model.lm_head, mb.index, mb.targets):
                logp = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False, **extra).logits
            (logp * mb.weight * mb.adv).sum().backward()
            order.append(mb.behaviour)  # the engine logprobs are distinct floats: a key per target
            logps.append(logp.detach())
        key, val = torch.cat(order), torch.cat(logps)
        got[share] = (val[key.argsort()], {n: p.grad.clone() for n, p in model.named_parameters()},
                      sum(mb.input_ids.numel() for mb in mbs))
    plain, cells = got[0][:2], got[0][2]
    for share in (16, 512):
        torch.testing.assert_close(got[share][0], plain[0], rtol=1e-5, atol=1e-5)
        for n, g in plain[1].items():
            torch.testing.assert_close(got[share][1][n], g, rtol=1e-4, atol=1e-6)
    assert got[512][2] < got[16][2] < cells  # and it is less work


def test_config_validation_names_the_field():
    assert LearnerConfig().validate() is not None
    with pytest.raises(ValueError, match=r"learner\.tis_cap"):
        LearnerConfig(tis_cap=1.1, clip_eps_high=0.2).validate()
    with pytest.raises(ValueError, match=r"learner\.total_steps"):
        LearnerConfig(schedule="cosine", warmup_steps=5, total_steps=5).validate()
    with pytest.raises(ValueError, match=r"learner\.mixed_precision"):
        LearnerConfig(mixed_precision=True).validate()
    with pytest.raises(ValueError, match=r"learner\.keep_last"):
        LearnerConfig(keep_last=0).validate()
    with pytest.raises(ValueError, match=r"learner\.shared_row_tokens"):
        LearnerConfig(shared_row_tokens=-1).validate()
    cfg = LearnerConfig.from_section(LearnerSection(clip_eps=0.3, keep_checkpoints=4, shared_row_tokens=0),
                                     model="tiny-moe", run_dir="/tmp/x", max_staleness=3)
    got = (cfg.clip_eps_low, cfg.clip_eps_high, cfg.keep_last, cfg.model, cfg.max_staleness, cfg.shared_row_tokens)
    assert got == (0.3, 0.3, 4, "tiny-moe", 3, 0)
    # The stack's default is the batcher's: one number, written in two places.
    assert LearnerSection().shared_row_tokens == LearnerConfig().shared_row_tokens == SHARED_ROW_TOKENS
