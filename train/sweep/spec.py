"""One training run of a study: its parameters and the stable id derived from them."""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from train.config import OPTIMIZERS


def train_args_text(train_args: Sequence[str]) -> str:
    """--train-args as a shell reads it back: the flags joined and quoted as one word ("'--batch-size 32'")."""
    return shlex.quote(shlex.join(train_args))


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides a run's outcome; equal specs are the same run (and share a result file)."""

    model: str
    dataset: str
    optimizer: str
    lr: float
    weight_decay: float
    epochs: int
    seed: int = 0
    # Flags passed unchanged to every `python -m train` of a study (data subset, batch size, ...).
    train_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.epochs >= 1 and self.seed >= 0):
            raise ValueError(f"invalid run parameters: {self}")

    @property
    def stem(self) -> str:
        """'conv' or 'patchify', from the registry."""
        from models.registry import get_config

        return get_config(self.model).stem.kind

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters."""
        d = asdict(self)
        d["train_args"] = list(self.train_args)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        """Inverse of `to_dict`."""
        return cls(**{**d, "train_args": tuple(d.get("train_args", ()))})

    @property
    def run_id(self) -> str:
        """Readable, filesystem-safe and stable: the key parameters plus a hash of all of them."""
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        return (
            f"{self.model}-{self.optimizer}-e{self.epochs}-lr{self.lr:.3g}-wd{self.weight_decay:.3g}"
            f"-s{self.seed}-{digest}"
        )
