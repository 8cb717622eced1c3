"""Learner stage: off-policy GRPO/PPO on FSDP2 (pure logic here; ``main.py`` is the socket shell).

Modules: ``config`` (``LearnerConfig``), ``loss`` (advantages, PPO/GRPO + TIS + KL),
``batch`` (TrainGroups → token-budget micro-batches, loss mask on completions),
``fsdp`` (meta init, ``fully_shard``, rank-0 load + broadcast, inference-only build),
``trainer`` (``Learner``: admission, ``train_step``, checkpoint/resume, ``full_state_dict``),
``checkpoint`` (DCP with completion marker, keep-last-k), ``feed`` (rank 0 → all ranks batch).

Nothing is imported here, so ``import stages.learner.config`` stays cheap.
"""
