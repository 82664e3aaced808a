"""Typed configs of the trainer and the optimizers (`[trainer]` and `[optim]`)."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

DENSE_OPTIMIZER_NAMES = ("adam", "adagrad", "sgd")
SPARSE_OPTIMIZER_NAMES = ("rowwise_adagrad", "adagrad", "adam", "sgd")
DEVICES = ("auto", "cpu", "cuda")
INIT_PARTS = ("model", "optim", "balancer")  # what a warm start takes from its parent (trainer.start)
PARTIAL_UNITS = ("reread", "skip")


@dataclass
class OptimConfig:
    dense: str = "adam"  # adam | adagrad | sgd
    dense_lr: float = 1e-3
    sparse: str = "rowwise_adagrad"  # rowwise_adagrad | adagrad | adam | sgd (fused, in backward)
    sparse_lr: float = 0.02
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.dense not in DENSE_OPTIMIZER_NAMES:
            raise ValueError(f"optim.dense {self.dense!r} unknown; choose from {list(DENSE_OPTIMIZER_NAMES)}")
        if self.sparse not in SPARSE_OPTIMIZER_NAMES:
            raise ValueError(f"optim.sparse {self.sparse!r} unknown; choose from {list(SPARSE_OPTIMIZER_NAMES)}")
        for key in ("dense_lr", "sparse_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"optim.{key} must be > 0, got {getattr(self, key)}")


@dataclass
class TrainerConfig:
    out_dir: str = ""  # the run's directory; a config file without one gets runs/<its name>
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
    keep_checkpoints: int = 3  # the newest K complete checkpoints are kept (0: all)
    checkpoint_dir: str = ""  # "": out_dir/checkpoints; or a path or URI (s3://bucket/run/ckpt)
    # write checkpoints in the background: training waits only while the state is copied to host
    # memory (which then holds one more copy of the rank's shard until the files are written)
    async_checkpoint: bool = False
    # resuming with a config that changes what was trained is refused unless this is true
    # (the keys that fix the data position can never change: see trainer.identity)
    allow_config_change: bool = False
    pg_timeout_s: float = 600.0  # a collective that waits longer (a dead or frozen rank) fails
    # a checkpoint save or load that takes longer (a store that stopped answering) ends the rank
    # with an error naming the store; size it for the largest checkpoint's transfer (0: no bound)
    storage_timeout_s: float = 900.0
    check_every: int = 0  # steps between non-finite checks (0: at log steps and checkpoints)
    device: str = "auto"  # auto (GPU if visible) | cpu | cuda; local rank i uses visible GPU i
    # warm start: a new run (new out_dir, new data) from a parent run directory or checkpoint (path
    # or URI), taking init_parts of it: "model" (tables and dense layers), "optim" (the fused
    # embedding and the dense optimizers' states), "balancer" (its buffers); then step 0
    init_from: str = ""
    init_parts: List[str] = field(default_factory=lambda: list(INIT_PARTS))
    refit_transforms: bool = False  # warm start: fit the dense transforms anew instead of the parent's
    # a resume under another split: a (file, row group) unit that was partly read is read again
    # ("reread": its rows already trained on are trained twice) or left out of the epoch ("skip")
    partial_units: str = "reread"

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.max_steps < 0:
            raise ValueError(f"trainer.epochs ({self.epochs}) and trainer.max_steps ({self.max_steps}) "
                             "must be >= 0")
        if self.epochs == 0 and self.max_steps == 0:
            raise ValueError("trainer.epochs = 0 and trainer.max_steps = 0: nothing to train")
        for key in ("eval_every", "log_every", "checkpoint_every", "keep_checkpoints", "check_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"trainer.{key} must be >= 0, got {getattr(self, key)}")
        if self.device not in DEVICES:
            raise ValueError(f"trainer.device must be one of {DEVICES}, got {self.device!r}")
        unknown = [p for p in self.init_parts if p not in INIT_PARTS]
        if unknown or "model" not in self.init_parts:
            raise ValueError(f"trainer.init_parts must hold 'model' and only parts of {list(INIT_PARTS)}, "
                             f"got {self.init_parts}")
        if self.partial_units not in PARTIAL_UNITS:
            raise ValueError(f"trainer.partial_units must be one of {PARTIAL_UNITS}, got {self.partial_units!r}")
        if self.storage_timeout_s < 0:
            raise ValueError(f"trainer.storage_timeout_s must be >= 0 (0: no bound), got {self.storage_timeout_s}")
        if not self.pg_timeout_s > 0:
            raise ValueError(f"trainer.pg_timeout_s must be > 0, got {self.pg_timeout_s}")


# The parser of every component's typed config (a TOML table -> its dataclass), here at the lowest
# floor that needs it: launch reads run configs with it, serving reads a run's own record.
class ConfigError(ValueError):
    pass


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, List, Sequence):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(args[0], value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        _, value_tp = typing.get_args(tp) or (str, Any)
        return {k: _coerce(value_tp, v, f"{where}.{k}") for k, v in value.items()}
    return value


def from_dict(cls: type, values: Dict[str, Any], where: str = "") -> Any:
    """Builds dataclass `cls` from a dict, rejecting keys it does not declare."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(where + '.' + k if where else k for k in unknown)}"
                          f"; {cls.__name__} accepts: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a component's own check (__post_init__): the message names the key
        raise ConfigError(str(e)) from e
