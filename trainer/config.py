"""Typed configs of the trainer and the optimizers (`[trainer]` and `[optim]`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class OptimConfig:
    dense: str = "adam"  # adam | adagrad | sgd
    dense_lr: float = 1e-3
    sparse: str = "rowwise_adagrad"  # rowwise_adagrad | adagrad | adam | sgd (fused, in backward)
    sparse_lr: float = 0.02
    eps: float = 1e-8


@dataclass
class TrainerConfig:
    out_dir: str = "runs/demo"
    epochs: int = 1
    max_steps: int = 0  # > 0: stop after this many steps (overrides epochs)
    eval_every: int = 0  # steps between evaluations; 0: only at the end
    log_every: int = 20  # steps between logged task weights / gradient norms
    checkpoint_every: int = 0  # steps between checkpoints; 0: none before the end
    checkpoint_at_end: bool = True
    resume: bool = True  # continue from out_dir/checkpoint if one exists
    seed: int = 0
    sharding_types: List[str] = field(default_factory=list)  # planner's choice if empty
    loss_normalization: str = "batch"  # batch | labelled (see trainer.task_model)
    precision: str = "fp32"  # dense part: fp32 | tf32 | bf16
    progress_bar: bool = True
    save_predictions: bool = False  # write the final eval predictions per rank (.npy)
