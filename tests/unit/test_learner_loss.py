"""Learner pure logic: GRPO advantages, PPO clip and dual clip, TIS cap, KL, metrics,
micro-batch packing and aggregation weights, config validation. No process group."""

import numpy as np
import pytest
import torch

from schemas.stack import LearnerSection
from stages.learner.batch import pack, rank_micro_batches, step_items
from stages.learner.config import LearnerConfig
from stages.learner.loss import grpo_advantages, policy_loss
from stages.testing import make_train_group


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
    [mb] = rank_micro_batches([g], aggregation="token_mean", budget=1000, rank=0, world=1,
                              device=torch.device("cpu"))
    prompt_len = len(g.scored.rollout.group.prompt_ids)
    width = mb.input_ids.shape[1]
    samples = g.scored.rollout.samples
    assert (mb.weight > 0).all() and len(mb.index) == sum(len(s.token_ids) for s in samples)
    # Loss positions are exactly each row's completion-predicting positions p-1 .. p-2+t.
    want = np.concatenate([r * width + np.arange(prompt_len - 1, prompt_len - 1 + len(s.token_ids))
                           for r, s in enumerate(samples)])
    np.testing.assert_array_equal(mb.index.numpy(), want)
    # The target at each position is the next input token, the completion's own token; the
    # behaviour logprob is the engine's.
    np.testing.assert_array_equal(mb.targets.numpy(), mb.input_ids.reshape(-1)[mb.index + 1].numpy())
    np.testing.assert_array_equal(mb.targets.numpy(), np.concatenate([s.token_ids for s in samples]))
    np.testing.assert_array_equal(mb.behaviour.numpy(), np.concatenate([s.logprobs for s in samples]))
    [idle] = rank_micro_batches([g], aggregation="token_mean", budget=1000, rank=1, world=2,
                                device=torch.device("cpu"))
    assert idle.weight.tolist() == [0.0] and len(idle.index) == 1  # an idle rank still runs a pass
    items = step_items([make_train_group(f"g{i}", n_samples=4, length=10, seed=i) for i in range(3)], "token_mean")
    for batch in pack(items, 40):
        assert len(batch) * max(len(it.tokens) for it in batch) <= 40 or len(batch) == 1


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
    cfg = LearnerConfig.from_section(LearnerSection(clip_eps=0.3, keep_checkpoints=4), model="tiny-moe",
                                     run_dir="/tmp/x", max_staleness=3)
    assert (cfg.clip_eps_low, cfg.clip_eps_high, cfg.keep_last, cfg.model, cfg.max_staleness) == (
        0.3, 0.3, 4, "tiny-moe", 3)
