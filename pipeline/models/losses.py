"""Region losses of stage 2 beside the per-pixel BCE (train.region_loss): soft Dice and the
Lovasz hinge (Berman et al. 2018, binary), each of one image's logits against its targets,
pixels weighted (Dice) or kept (Lovasz) where their weight is positive. Pure torch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1.0  # keeps the Dice of an image without object pixels defined (and 0 there)


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, smooth: float = DICE_SMOOTH
) -> torch.Tensor:
    """1 - the soft Dice coefficient of sigmoid(logits) and the (soft) targets, each pixel
    weighted by `weight` (same shape; 0 leaves a pixel out)."""
    p = torch.sigmoid(logits)
    inter = (weight * p * target).sum()
    total = (weight * p).sum() + (weight * target).sum()
    return 1 - (2 * inter + smooth) / (total + smooth)


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """The Lovasz extension's weights of the Jaccard loss for binary labels sorted by
    decreasing error: the Jaccard loss of each prefix less that of the one before."""
    gts = gt_sorted.sum()
    inter = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1 - inter / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_hinge_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """The Lovasz hinge of one image: the Lovasz extension of the Jaccard loss applied to
    the hinge errors 1 - logit x sign, over the pixels with weight > 0 (targets binarised at
    0.5, as soft patch targets are)."""
    keep = weight.flatten() > 0
    lg = logits.flatten()[keep]
    if lg.numel() == 0:
        return logits.sum() * 0  # no pixel: a zero that keeps the graph
    y = (target.flatten()[keep] > 0.5).to(lg.dtype)
    errors = 1 - lg * (2 * y - 1)
    errors_sorted, perm = torch.sort(errors, descending=True)
    return torch.dot(F.relu(errors_sorted), lovasz_grad(y[perm]))


@dataclass(frozen=True)
class RegionLoss:
    """The region term of both heads' losses: `kind` "none" | "dice" | "lovasz", scaled by
    `weight` (train.region_loss, train.region_weight)."""

    kind: str = "none"
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("none", "dice", "lovasz"):
            raise ValueError(f"unknown region loss {self.kind!r}")

    def __call__(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor | float:
        """weight x the region loss of one image (0.0 for "none": nothing added)."""
        if self.kind == "none":
            return 0.0
        fn = soft_dice_loss if self.kind == "dice" else lovasz_hinge_loss
        return self.weight * fn(logits, target, weight)
