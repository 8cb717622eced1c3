"""``Learner``: one rank's training logic (no sockets). Every rank runs the same calls.

Per step: ``admit`` (rank 0 filters the groups it pulled: duplicates and over-stale ones are
dropped with a reason; exactly-once into training), then on every rank ``train_step`` on
the same groups: micro-batches (identical count on all ranks), backward, gradient clipping,
and a collective decision on the gradient norm.

Invariants and failure behaviour:
- Non-finite gradient norm ⇒ every rank skips: no ``optimizer.step`` (so no weight decay,
  no Adam moment or step-count change), no scheduler step, gradients zeroed; the version
  does not advance. Parameters, optimizer and scheduler state are bit-identical to before.
- One collective after all micro-batches carries every rank's metric sums/maxima/minima
  and its non-finite flag (``all_gather`` of one small vector): metrics are reduced once per
  step and the skip decision is taken from the same exchange, so ranks cannot disagree.
- ``version`` counts applied updates; ``step`` counts ``train_step`` calls (skips included).
  The groups of a skipped step count as consumed (retrying the same data would likely fail
  the same way); the shell reports them in Progress like any other step.
- Consumed ids are appended per step to ``consumed.jsonl`` (rank 0) and kept in the
  checkpoint with every other terminal id, so a resumed learner still refuses duplicates,
  and a group dropped as stale is never trained later from another copy. ``resume``
  appends a ``{"resumed": step}`` line: steps logged after that checkpoint were rolled back.
  ``checkpoint_step`` (newest complete checkpoint) rides on every ``Progress`` so the source
  keeps groups consumed after it and reissues them when the learner rolls back to it.
- Every rank must call ``train_step``/``save_checkpoint``/``resume``/``full_state_dict``
  with the same arguments in the same order (they are collectives); ``admit`` is rank-0
  logic and needs no peers.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import torch
import torch.distributed as dist

from schemas.messages import DroppedGroup, GroupFailed, Progress, TrainGroup
from stages.learner import checkpoint as ckpt
from stages.learner.batch import group_problem, rank_micro_batches
from stages.learner.config import LearnerConfig
from stages.learner.fsdp import build_sharded, full_parameters
from stages.learner.head import logprob_head
from stages.learner.loss import MAX_METRICS, MIN_METRICS, SUM_METRICS, grpo_advantages, policy_loss
from stages.model import is_moe

CONSUMED_FILE = "consumed.jsonl"
SUM_KEYS = ("loss", "aux_loss") + SUM_METRICS
"""Layout of the per-step exchange vector: sums, then maxima, then minima, then the flag."""
DEFAULT_ROUTER_AUX_COEF = 0.001
"""Qwen3-MoE's published router load-balancing coefficient, used when a config lacks one."""


@dataclass
class StepResult:
    step: int
    version: int
    skipped: bool
    consumed_ids: list[str]
    metrics: dict[str, float] = field(default_factory=dict)

    def progress(self, dropped: list[DroppedGroup] | None = None, checkpoint_step: int = -1) -> Progress:
        """The Progress message announcing this step (consumed ids; drops, if any, ride along)."""
        return Progress(self.step, self.version, list(self.consumed_ids), list(dropped or []), checkpoint_step)


def lr_lambda(cfg: LearnerConfig):
    """LR multiplier after ``k`` applied updates: linear warm-up, then constant/cosine/linear."""
    def factor(k: int) -> float:
        if cfg.warmup_steps > 0 and k < cfg.warmup_steps:
            return (k + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        done = min(1.0, (k - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * done)) if cfg.schedule == "cosine" else 1.0 - done
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape
    return factor


def sample_lags(group: TrainGroup, version: int) -> list[int]:
    """Per sample: learner ``version`` minus the oldest weight version among its tokens (the
    group's ``issued_version`` for a sample without version spans)."""
    issued = group.scored.rollout.group.issued_version
    # One span per sample unless weights changed mid-generation: read it without a reduction.
    return [version - (int(sp[0, 1]) if len(sp) == 1 else int(sp[:, 1].min()) if len(sp) else issued)
            for sp in (s.version_spans for s in group.scored.rollout.samples)]


def sample_lag(group: TrainGroup, version: int) -> int:
    """The group's lag: its oldest sample's (what the staleness filter judges)."""
    return max(sample_lags(group, version), default=version - group.scored.rollout.group.issued_version)


class Learner:
    """One rank of the learner. Requires an initialised ``torch.distributed`` group (gloo on
    CPU, NCCL on CUDA); build it on every rank with the same config."""

    def __init__(self, cfg: LearnerConfig, *, run_dir: str | Path | None = None, max_staleness: int | None = None,
                 seed: int | None = None, device: str | torch.device | None = None) -> None:
        overrides = {k: v for k, v in dict(run_dir=None if run_dir is None else str(run_dir),
                                            max_staleness=max_staleness, seed=seed,
                                            device=None if device is None else str(device)).items()
                     if v is not None}
        cfg = msgspec.structs.replace(cfg, **overrides)
        self.cfg = cfg.validate()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(cfg.device)
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.max_staleness = cfg.max_staleness
        self.model = build_sharded(cfg.model, device=self.device, seed=cfg.seed,
                                   mixed_precision=cfg.mixed_precision,
                                   activation_checkpointing=cfg.activation_checkpointing,
                                   compile_layers=cfg.compile_layers)
        self.moe = is_moe(self.model.config)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step = 0
        self.version = 0
        self.checkpoint_step = -1
        """Step of the newest complete checkpoint written or resumed (-1: none)."""
        self.consumed: set[str] = set()
        self.terminal: set[str] = set()
        """Ids that reached a terminal state (trained, or dropped as stale/failed): any later
        copy of them (a lease reissue already in flight) is a duplicate, so each issued
        group ends in exactly one terminal state."""
        self.dropped_counts = {"duplicate": 0, "stale": 0, "failed": 0, "invalid": 0}
        self._ckpt_group = dist.new_group(backend="gloo") if cfg.async_checkpoint else None
        """Background checkpoints' own gloo group (made by every rank, in the same order)."""
        self._pending_save: ckpt.PendingSave | None = None
        self._stager = ckpt.make_stager(self.device) if cfg.async_checkpoint else None
        """Copies the state out for background saves; keeps its (pinned) buffers between saves."""

    # ------------------------------------------------------------------ admission (rank 0)
    def admit(self, groups: list[TrainGroup | GroupFailed], in_step: set[str] = frozenset()
              ) -> tuple[list[TrainGroup], list[DroppedGroup]]:
        """Split pulled groups into trainable ones and terminal drops (with reasons);
        ``in_step``: ids already admitted into the step being assembled."""
        keep, dropped, seen = [], [], set(in_step)
        for g in groups:
            if isinstance(g, GroupFailed):
                if g.group_id not in self.terminal and g.group_id not in seen:
                    dropped.append(DroppedGroup(g.group_id, f"failed: {g.reason}"))
                    self.dropped_counts["failed"] += 1
                    self.terminal.add(g.group_id)
                else:  # already terminal here: still answer, the source waits for a reply
                    dropped.append(DroppedGroup(g.group_id, "duplicate"))
                    self.dropped_counts["duplicate"] += 1
                continue
            gid = g.scored.rollout.group.group_id
            if gid in self.terminal or gid in seen:
                dropped.append(DroppedGroup(gid, "duplicate"))
                self.dropped_counts["duplicate"] += 1
            elif (problem := group_problem(g)) is not None:
                dropped.append(DroppedGroup(gid, f"invalid: {problem}"))
                self.dropped_counts["invalid"] += 1
                self.terminal.add(gid)
            elif sample_lag(g, self.version) > self.max_staleness:
                dropped.append(DroppedGroup(gid, "stale"))
                self.dropped_counts["stale"] += 1
                self.terminal.add(gid)
            else:
                keep.append(g)
                seen.add(gid)
        return keep, dropped

    def record_dropped(self, dropped: list[DroppedGroup]) -> None:
        """Append terminal drops to ``consumed.jsonl`` (rank 0), next to trained ids, so
        issued.jsonl can be reconciled against one file."""
        if dropped and self.rank == 0:
            with open(self.run_dir / CONSUMED_FILE, "a") as f:
                f.write(json.dumps({"step": self.step, "version": self.version, "time": time.time(),
                                    "dropped": [[d.group_id, d.reason] for d in dropped]}) + "\n")

    # ------------------------------------------------------------------ training (all ranks)
    def train_step(self, groups: list[TrainGroup], *, corrupt_grads: bool = False) -> StepResult:
        """One optimizer step on ``groups`` (identical on every rank; collective). ``corrupt_grads``
        writes NaN into this rank's gradient shards (fault injection for tests)."""
        cfg = self.cfg
        # Zero-advantage sequences add exactly nothing to the gradient unless a KL term or an
        # MoE router loss sees them; skipping them is exact and, once a group's samples all
        # score alike (early: all wrong; late: all right), saves most of the step.
        skip_zero = cfg.kl_coef == 0.0 and not self.moe
        mbs = rank_micro_batches(groups, aggregation=cfg.aggregation, budget=cfg.micro_batch_tokens,
                                 rank=self.rank, world=self.world, device=self.device,
                                 skip_zero_advantage=skip_zero,
                                 # HF's MoE load-balancing loss reads a [B, L] padding mask;
                                 # a shared-prompt row's mask is [B, 1, L, L].
                                 shared_row_tokens=0 if self.moe else cfg.shared_row_tokens)
        records: list[dict[str, torch.Tensor]] = []  # per micro-batch, read after the loop (no per-mb sync)
        for mb in mbs:
            # use_cache=False: a KV cache growing during the forward would make activation
            # checkpointing's recompute see different shapes.
            extra = {"output_router_logits": True} if self.moe else {}
            if mb.position_ids is not None:
                extra["position_ids"] = mb.position_ids
            with logprob_head(self.model.lm_head, mb.index, mb.targets, fused=cfg.compile_layers):
                out = self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False, **extra)
            loss, met = policy_loss(out.logits, mb.behaviour, mb.adv, mb.weight, kind=cfg.loss,
                                    clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
                                    tis_cap=cfg.tis_cap, ref_logp=mb.ref, kl_coef=cfg.kl_coef)
            if self.moe and getattr(out, "aux_loss", None) is not None:
                # Router load balancing only exists for MoE; averaged over the step's micro-batches.
                coef = getattr(self.model.config, "router_aux_loss_coef", DEFAULT_ROUTER_AUX_COEF)
                aux = out.aux_loss * coef / len(mbs)
                loss = loss + aux
                met["aux_loss"] = aux.detach()
            # Weights are normalised over the whole step; FSDP averages gradients over
            # ranks, so scale by the world size to get the sum.
            (loss * self.world).backward()
            met["loss"] = loss.detach()
            records.append(met)
        sums = {k: sum(float(r[k]) for r in records if k in r) for k in SUM_KEYS}
        maxes = {k: max(float(r[k]) for r in records) for k in MAX_METRICS}
        mins = {k: min(float(r[k]) for r in records) for k in MIN_METRICS}
        if corrupt_grads:
            for p in self.model.parameters():
                if p.grad is not None:
                    (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).fill_(float("nan"))
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        # The single per-step exchange: metrics of every rank plus its verdict on the norm.
        mine = torch.tensor([*sums.values(), *maxes.values(), *mins.values(),
                             0.0 if np.isfinite(norm) else 1.0], dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        table = torch.stack(gathered).cpu()
        n_sum, n_max = len(sums), len(maxes)
        total = dict(zip(SUM_KEYS, table[:, :n_sum].sum(0).tolist()))
        total.update(zip(MAX_METRICS, table[:, n_sum:n_sum + n_max].max(0).values.tolist()))
        total.update(zip(MIN_METRICS, table[:, n_sum + n_max:-1].min(0).values.tolist()))
        skipped = bool(table[:, -1].max() > 0)
        if self._pending_save is not None:  # a background save may still be copying the state out
            self._pending_save.wait_staged()
        if not skipped:
            self.optimizer.step()
            self.scheduler.step()
            self.version += 1
        # Skipped or not, gradients are dropped: nothing of a rejected step survives.
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = max(total["tokens"], 1.0)
        ids = [g.scored.rollout.group.group_id for g in groups]
        rewards = np.concatenate([g.scored.rewards for g in groups]) if groups else np.zeros(0)
        trained_at = self.version - (0 if skipped else 1)
        lags = [lag for g in groups for lag in sample_lags(g, trained_at)]
        zero_adv = np.concatenate([grpo_advantages(g.scored.rewards) == 0 for g in groups]) if groups else []
        metrics = {
            "loss": total["loss"], "aux_loss": total["aux_loss"], "grad_norm": norm, "skipped": float(skipped),
            "tokens": total["tokens"], "reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
            "logprob_gap_mean": total["logprob_gap_abs_sum"] / tokens,
            "logprob_gap_max": total["logprob_gap_abs_max"],
            "is_weight_mean": total["is_weight_sum"] / tokens, "is_weight_max": total["is_weight_max"],
            "is_weight_min": total["is_weight_min"] if np.isfinite(total["is_weight_min"]) else 0.0,
            "is_truncated_frac": total["is_truncated_tokens"] / tokens,
            "is_clipped_frac": total["clipped_tokens"] / tokens, "kl_mean": total["kl_sum"] / tokens,
            "zero_adv_frac": float(np.mean(zero_adv)) if len(zero_adv) else 0.0,
            "staleness_mean": float(np.mean(lags)) if lags else 0.0, "staleness_max": float(max(lags, default=0)),
            # the distribution: share of the step's samples at each lag 0..max_staleness
            **{f"staleness_frac_{k}": (lags.count(k) / len(lags) if lags else 0.0) for k in range(self.max_staleness + 1)},
            "lr": self.scheduler.get_last_lr()[0], "weight_version": float(self.version),
        }
        self.consumed.update(ids)
        self.terminal.update(ids)
        if self.rank == 0:
            with open(self.run_dir / CONSUMED_FILE, "a") as f:
                f.write(json.dumps({"step": self.step, "version": self.version, "skipped": skipped,
                                    "time": time.time(), "consumed": ids}) + "\n")
        return StepResult(self.step, self.version, skipped, ids, metrics)

    # ------------------------------------------------------------------ state
    def trainer_state(self) -> dict:
        return {"step": self.step, "version": self.version, "scheduler": self.scheduler.state_dict(),
                "consumed": sorted(self.consumed), "terminal": sorted(self.terminal),
                "dropped_counts": self.dropped_counts}

    def save_checkpoint(self, wait: bool = True) -> Path | None:
        """Collective DCP save of model, optimizer, scheduler, step, version, consumed ids.
        With ``async_checkpoint`` and ``wait=False`` the write goes on in the background and
        None is returned: ``checkpoint_step`` moves when ``finish_checkpoint`` completes it.
        A save first finishes the previous one (one in flight)."""
        self.finish_checkpoint()
        root = self.run_dir / "checkpoints"
        if self._ckpt_group is None:
            path = ckpt.save(root, self.step, self.model, self.optimizer, self.trainer_state(), self.cfg.keep_last)
            self.checkpoint_step = self.step
            return path
        self._pending_save = ckpt.save_async(root, self.step, self.model, self.optimizer, self.trainer_state(),
                                             self.cfg.keep_last, self._ckpt_group, self._stager)
        return self.finish_checkpoint() if wait else None

    def checkpoint_busy(self) -> bool:
        """Collective (training's group): whether any rank's background checkpoint is still
        being written, so that a save now would first wait for it. False, with no
        collective, when checkpoints are written in the foreground."""
        if self._ckpt_group is None:
            return False
        busy = torch.tensor([float(self._pending_save is not None and not self._pending_save.done())],
                            device=self.device)
        dist.all_reduce(busy, op=dist.ReduceOp.MAX)
        return bool(busy.item())

    def checkpoint_written(self) -> bool:
        """Whether a background checkpoint waits only for ``finish_checkpoint`` (this rank)."""
        return self._pending_save is not None and self._pending_save.done()

    def finish_checkpoint(self) -> Path | None:
        """Complete the background checkpoint, waiting for its write; None if there is none.
        Not a collective (rank 0 writes the marker); raises if the write failed."""
        pending, self._pending_save = self._pending_save, None
        if pending is None:
            return None
        path = pending.finish()
        self.checkpoint_step = pending.step
        return path

    def resume(self) -> bool:
        """Load the newest complete checkpoint if there is one (collective); False if none."""
        path = ckpt.latest_complete(self.run_dir / "checkpoints")
        if path is None:
            return False
        state = ckpt.load(path, self.model, self.optimizer)
        self.step, self.version = state["step"], state["version"]
        self.checkpoint_step = self.step
        self.scheduler.load_state_dict(state["scheduler"])
        self.consumed = set(state["consumed"])
        self.terminal = set(state.get("terminal", state["consumed"]))
        self.dropped_counts.update(state.get("dropped_counts", {}))
        if self.rank == 0:
            with open(self.run_dir / CONSUMED_FILE, "a") as f:
                f.write(json.dumps({"resumed": self.step, "version": self.version, "time": time.time()}) + "\n")
        return True

    def full_state_dict(self, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Collective; rank 0 gets every parameter, full, in ``dtype`` on ``device`` (None:
        CPU), for the publisher; other ranks get {}. Every rank passes the same kind of
        device (``fsdp.full_parameters``)."""
        return full_parameters(self.model, dtype, device)

    full_parameters = full_state_dict
    """Name used by the stage shell (``main.py``)."""
