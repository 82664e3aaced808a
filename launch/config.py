"""Run configuration: TOML files in `launch/configs/` parsed into the typed configs that each
component owns, with `--set section.key=value` overrides.

Each section of the TOML file maps onto one dataclass field of `RunConfig`; unknown keys are
errors that name the key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence

from balancing import BalancerConfig
from data.schema import DataConfig
from data.synth import SynthConfig
from models.mtl import ModelConfig
from trainer.config import ConfigError, OptimConfig, TrainerConfig, from_dict


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: take it as a string


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """`section.key=value` (value in TOML syntax; bare words are strings)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k} is not a table")
        node[keys[-1]] = _parse_value(text.strip())
    return raw


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config of a TOML file and overrides; a file that names no `trainer.out_dir` gets
    `runs/<its name>` (never another config's directory)."""
    raw: Dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path, "rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: not valid TOML: {e}") from e
    raw = apply_overrides(raw, overrides)
    if path is not None and not raw.get("trainer", {}).get("out_dir"):
        raw.setdefault("trainer", {})["out_dir"] = f"runs/{Path(path).stem}"
    return from_dict(RunConfig, raw)


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def fmt(v: Any) -> str:
    """A value in TOML syntax."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {fmt(x)}" for k, x in v.items()) + "}"
    return repr(v)


def dump_toml(cfg: RunConfig) -> str:
    """Serialises a RunConfig back to TOML (used to pass a resolved config to launched ranks)."""
    lines: List[str] = []

    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if v is None:
                continue
            lines.append(f"{k} = {fmt(v)}")
        lines.append("")
    return "\n".join(lines)


DRAFT_NOTES = {
    "model.embedding_dim": "every table's dim unless it sets its own",
    "model.shared_arch": "the shared MLP; its last size is the representation MultiBalance balances",
    "model.head_bias_init": "heads start at logit(training base rate), not p = 0.5",
    "balancer.method": "equal, multibalance, ... (README: Balancers); compare them with `mbrec compare`",
    "optim.sparse": "the fused embedding optimizer (row-wise Adagrad: one state value per row)",
    "trainer.out_dir": "this run's own directory: checkpoints, metrics, summary.json",
    "trainer.epochs": "passes over data.train: 1, the default, chosen by the draft (raise it to train longer)",
    "trainer.eval_every": "steps between evaluations (0: at the end only)",
    "trainer.checkpoint_every": "steps between checkpoints (0: one at the end); a restart resumes from the newest",
}


def drafted_sections(name: str) -> str:
    """[model], [balancer], [optim] and [trainer] of a drafted config: the defaults, written out
    with what each is, and an out_dir of the run's own."""
    cfg = RunConfig()
    cfg.trainer.out_dir = f"runs/{name}"
    keep = {"model": None, "balancer": ["method"], "optim": None,
            "trainer": ["out_dir", "epochs", "eval_every", "checkpoint_every", "log_every", "seed"]}
    lines: List[str] = []
    for section, keys in keep.items():
        lines.append(f"\n[{section}]")
        for k, v in to_dict(getattr(cfg, section)).items():
            if (keys is None or k in keys) and v is not None:
                note = DRAFT_NOTES.get(f"{section}.{k}")
                lines.append(f"{k} = {fmt(v)}" + (f"  # {note}" if note else ""))
    return "\n".join(lines) + "\n"
