"""``Learner``: one rank's training logic (no sockets). Every rank runs the same calls.

Per step: ``admit`` (rank 0 filters the groups it pulled: duplicates and over-stale ones are
dropped with a reason; exactly-once into training), then on every rank ``train_step`` on
the same groups: micro-batches (identical count on all ranks), backward, gradient clipping,
and a collective decision on the gradient norm.

Invariants and failure behaviour:
- Non-finite gradient norm ⇒ every rank skips (the norm is a global reduction, and the
  decision is all-reduced again to be sure): no ``optimizer.step`` (so no weight decay, no
  Adam moment or step-count change), no scheduler step, gradients zeroed; the version does
  not advance. Parameters, optimizer and scheduler state are bit-identical to before.
- Metrics are summed locally over micro-batches and all-reduced once per step.
- ``version`` counts applied updates; ``step`` counts ``train_step`` calls (skips included).
- Consumed ids are appended per step to ``consumed.jsonl`` (rank 0) and kept in the
  checkpoint with every other terminal id, so a resumed learner still refuses duplicates,
  and a group dropped as stale is never trained later from another copy.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from schemas.messages import DroppedGroup, GroupFailed, TrainGroup
from schemas.stack import LearnerSection
from stages.learner import checkpoint as ckpt
from stages.learner.batch import rank_micro_batches
from stages.learner.loss import policy_loss
from stages.learner.sharding import build_sharded, full_parameters
from stages.model import is_moe

CONSUMED_FILE = "consumed.jsonl"
METRIC_KEYS = ("loss", "tokens", "logprob_gap_abs", "is_weight_sum", "is_weight_max", "clipped_tokens", "kl_sum",
               "aux_loss")


@dataclass
class StepResult:
    step: int
    version: int
    skipped: bool
    consumed_ids: list[str]
    metrics: dict[str, float] = field(default_factory=dict)


def sample_lag(group: TrainGroup, version: int) -> int:
    """Learner version minus the oldest weight version among the group's tokens."""
    oldest = min((int(s.version_spans[:, 1].min()) for s in group.scored.rollout.samples if len(s.version_spans)),
                 default=group.scored.rollout.group.issued_version)
    return version - oldest


class Learner:
    def __init__(self, cfg: LearnerSection, *, model_name: str, run_dir: Path, max_staleness: int, seed: int = 0,
                 device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device)
        self.run_dir = Path(run_dir)
        self.max_staleness = max_staleness
        self.model = build_sharded(model_name, device=self.device, seed=seed,
                                   activation_checkpointing=cfg.activation_checkpointing)
        self.moe = is_moe(self.model.config)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(0.9, 0.999), eps=1e-8)
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda k: min(1.0, (k + 1) / warmup) if warmup > 0 else 1.0)
        self.step = 0
        self.version = 0
        self.consumed: set[str] = set()
        self.terminal: set[str] = set()
        """Ids that reached a terminal state (trained, or dropped as stale/failed): any later
        copy of them (a lease reissue already in flight) is a duplicate, so each issued
        group ends in exactly one terminal state."""
        self.dropped_counts = {"duplicate": 0, "stale": 0, "failed": 0}

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
                continue
            gid = g.scored.rollout.group.group_id
            if gid in self.terminal or gid in seen:
                dropped.append(DroppedGroup(gid, "duplicate"))
                self.dropped_counts["duplicate"] += 1
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
        """One optimizer step on ``groups`` (identical on every rank). ``corrupt_grads``
        writes NaN into this rank's gradients (fault injection for tests)."""
        cfg = self.cfg
        mbs = rank_micro_batches(groups, aggregation=cfg.aggregation, budget=cfg.micro_batch_tokens,
                                 rank=self.rank, world=self.world, device=self.device)
        sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64)
        for mb in mbs:
            # use_cache=False: a KV cache growing during the forward would make activation
            # checkpointing's recompute see different shapes.
            extra = {"output_router_logits": True} if self.moe else {}
            out = self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False, **extra)
            logits = out.logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, mb.targets[..., None])[..., 0]
            m = mb.weight > 0
            loss, met = policy_loss(logp[m], mb.behaviour[m], mb.adv[m], mb.weight[m], kind=cfg.loss,
                                    clip_eps=cfg.clip_eps, tis_cap=cfg.tis_cap,
                                    ref_logp=mb.ref[m] if mb.ref is not None else None, kl_coef=cfg.kl_coef)
            if self.moe and getattr(out, "aux_loss", None) is not None:
                coef = getattr(self.model.config, "router_aux_loss_coef", 0.001)
                aux = out.aux_loss * coef / len(mbs)
                loss = loss + aux
                met["aux_loss"] = aux.detach()
            # Weights are normalised over the whole step; FSDP averages gradients over
            # ranks, so scale by the world size to get the sum.
            (loss * self.world).backward()
            met["loss"] = loss.detach()
            for i, k in enumerate(METRIC_KEYS):
                if k in met:
                    v = met[k].double()
                    sums[i] = torch.maximum(sums[i], v) if k == "is_weight_max" else sums[i] + v
        if corrupt_grads:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.to_local().fill_(float("nan")) if hasattr(p.grad, "to_local") else p.grad.fill_(float("nan"))
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        bad = torch.tensor([0.0 if torch.isfinite(norm) else 1.0])
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        skipped = bool(bad.item())
        if not skipped:
            self.optimizer.step()
            self.scheduler.step()
            self.version += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        maxes = sums[METRIC_KEYS.index("is_weight_max")].clone()
        dist.all_reduce(sums)  # once per step, after every micro-batch
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        vals = dict(zip(METRIC_KEYS, sums.tolist()))
        tokens = max(vals["tokens"], 1.0)
        ids = [g.scored.rollout.group.group_id for g in groups]
        rewards = np.concatenate([g.scored.rewards for g in groups]) if groups else np.zeros(0)
        lags = [sample_lag(g, self.version - (0 if skipped else 1)) for g in groups]
        metrics = {
            "loss": vals["loss"], "grad_norm": float(norm), "skipped": float(skipped), "tokens": vals["tokens"],
            "reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
            "logprob_gap_mean": vals["logprob_gap_abs"] / tokens, "is_weight_mean": vals["is_weight_sum"] / tokens,
            "is_weight_max": float(maxes.item()), "is_clipped_frac": vals["clipped_tokens"] / tokens,
            "kl_mean": vals["kl_sum"] / tokens, "aux_loss": vals["aux_loss"],
            "staleness_mean": float(np.mean(lags)) if lags else 0.0, "staleness_max": float(max(lags, default=0)),
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

    def save_checkpoint(self) -> Path:
        return ckpt.save(self.run_dir / "checkpoints", self.step, self.model, self.optimizer,
                         self.trainer_state(), self.cfg.keep_checkpoints)

    def resume(self) -> bool:
        """Load the newest complete checkpoint if there is one (collective)."""
        path = ckpt.latest_complete(self.run_dir / "checkpoints")
        if path is None:
            return False
        state = ckpt.load(path, self.model, self.optimizer)
        self.step, self.version = state["step"], state["version"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.consumed = set(state["consumed"])
        self.terminal = set(state.get("terminal", state["consumed"]))
        self.dropped_counts = state.get("dropped_counts", self.dropped_counts)
        return True

    def full_parameters(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Collective; rank 0 gets the full parameters for the publisher."""
        return full_parameters(self.model, dtype)
