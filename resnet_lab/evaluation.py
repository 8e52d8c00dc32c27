"""One evaluation protocol and one device policy for every model a stage makes or reads.

Every accuracy of the lab is measured the way the baseline's was: float32 (no autocast), the baseline's
test-time flip, the stage's evaluation batch size, on the compute device — except for a model whose kernels
exist only on the CPU (INT8), which is evaluated there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import data as data_mod
from . import train


@dataclass
class Protocol:
    dataset: data_mod.Dataset
    flip: bool  # the baseline's test-time flip
    batch_size: int
    device: torch.device

    def device_for(self, cpu_only: bool = False) -> torch.device:
        """The compute device, except for a model whose kernels exist only on the CPU."""
        return torch.device("cpu") if cpu_only else self.device

    def predict(self, model: nn.Module, split: str, cpu_only: bool = False, flip: bool | None = None) -> torch.Tensor:
        """Logits of every image of a split (`flip` overrides the baseline's for a relative measure such as the
        sensitivity analysis)."""
        return train.predict_split(model, getattr(self.dataset, split), self.batch_size,
                                   self.flip if flip is None else flip, self.device_for(cpu_only))

    def accuracy(self, model: nn.Module, split: str = "test", cpu_only: bool = False, flip: bool | None = None) -> float:
        """Accuracy (%) on one split (nan for an empty split)."""
        labels = getattr(self.dataset, split).labels
        return train.score(self.predict(model, split, cpu_only, flip), labels)["acc"] if len(labels) else float("nan")

    def evaluate(self, model: nn.Module, cpu_only: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Test and validation accuracy and loss, and the logits of every image of both splits."""
        out, logits = {}, {}
        for split in ("test", "val"):
            labels = getattr(self.dataset, split).labels
            if not len(labels):
                out[f"{split}_acc"] = out[f"{split}_loss"] = None
                continue
            logits[split] = self.predict(model, split, cpu_only)
            r = train.score(logits[split], labels)
            out[f"{split}_acc"], out[f"{split}_loss"] = r["acc"], r["loss"]
        return out, logits
