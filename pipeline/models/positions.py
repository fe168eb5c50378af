"""The ViTs' position embeddings at sizes other than the trained one, as DINO and DINOv2
resize them (`official_pos_embed`; `_exportable_pos_embed` for torch.export), and the ViT
forward that uses them (`vit_forward_features`): timm's modules, DINO's rule.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..core.errors import BackboneError

if TYPE_CHECKING:  # timm is imported when a ViT is built (it takes a second)
    from timm.models.vision_transformer import VisionTransformer

# DINO / DINOv2's work-around offset in the position-embedding interpolation (their
# `interpolate_offset`, 0.1 in the released models; facebookresearch/dino issue #8)
POS_INTERPOLATE_OFFSET = 0.1


def official_pos_embed(
    pos_embed: torch.Tensor, num_prefix: int, grid: tuple[int, int]
) -> torch.Tensor:
    """The position embeddings (1, num_prefix + h*w, C) for a grid of h x w patches, resized
    as DINO and DINOv2 do (`interpolate_pos_encoding`): bicubic, align_corners=False, no
    antialias, with `scale_factor=((h + 0.1) / M, (w + 0.1) / M)` (not an output size: the
    sampling positions follow that scale), in float32; unchanged at the trained M x M grid.
    timm's dynamic_img_size resizes to the exact size with antialiasing instead, which moves
    the final features (e.g. by up to 1.4e-2 for ViT-S/16 with random weights at 480x848)."""
    h, w = grid
    n = pos_embed.shape[1] - num_prefix
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position embeddings of {n} patches are not a square grid")
    if torch.compiler.is_exporting():
        return _exportable_pos_embed(pos_embed, num_prefix, m, grid)
    if (h, w) == (m, m):
        return pos_embed
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, num_prefix:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    patch = nn.functional.interpolate(
        patch,
        scale_factor=((h + POS_INTERPOLATE_OFFSET) / m, (w + POS_INTERPOLATE_OFFSET) / m),
        mode="bicubic",
        align_corners=False,
    )
    if tuple(patch.shape[-2:]) != (h, w):  # the offset makes floor(m * scale) == h, w
        raise RuntimeError(
            f"position embeddings resized to {tuple(patch.shape[-2:])}, not {(h, w)}"
        )
    patch = patch.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat((pos_embed[:, :num_prefix], patch), dim=1)


_CUBIC_A = -0.75  # the bicubic convolution constant of torch's (and OpenCV's) "bicubic" mode


def _dino_resize_matrix(size: int, m: int, identity: torch.Tensor) -> torch.Tensor:
    """(size, m) float64: row y holds the bicubic taps that `official_pos_embed`'s resize
    (scale factor (size + 0.1) / m, align_corners=False, borders clamped) gives output y,
    or the identity rows where `identity` (a bool tensor: the trained grid) holds. The size
    enters as a tensor, never as a Python float, so torch.export keeps it symbolic."""
    dst = torch.arange(size, dtype=torch.float64, device=identity.device)
    n = dst[-1:] + 1  # `size` as a tensor
    src = (dst + 0.5) * (m / (n + POS_INTERPOLATE_OFFSET)) - 0.5
    i0 = src.floor()
    t = src - i0
    u = 1 - t
    a = _CUBIC_A
    taps = (
        ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        ((a + 2) * u - (a + 3)) * u * u + 1,
        ((a * (u + 1) - 5 * a) * (u + 1) + 8 * a) * (u + 1) - 4 * a,
    )
    i0 = i0.long()
    mat = sum(
        nn.functional.one_hot((i0 + k - 1).clamp(0, m - 1), m).double() * wk[:, None]
        for k, wk in enumerate(taps)
    )
    eye = nn.functional.one_hot(
        torch.arange(size, device=identity.device).clamp(max=m - 1), m
    ).double()
    return torch.where(identity, eye, mat)


def _exportable_pos_embed(
    pos_embed: torch.Tensor, num_prefix: int, m: int, grid: tuple[int, int]
) -> torch.Tensor:
    """`official_pos_embed` for torch.export, where the grid size is symbolic: the same
    resize written as two interpolation matrices (float64), with no Python branch or float
    on the grid size (F.interpolate's scale factor would be frozen to the example's grid).
    Agrees with the eager resize to float32 rounding (a few parts in a million: torch's
    kernel computes the sampling positions in float32), not bit for bit, which is why the
    eager path keeps torch's kernel (the feature cache's values)."""
    h, w = grid
    dim = pos_embed.shape[-1]
    rows = torch.arange(h, device=pos_embed.device)  # on the embeddings' device, not cpu
    cols = torch.arange(w, device=pos_embed.device)
    trained = ((rows[-1:] + 1) == m) & ((cols[-1:] + 1) == m)  # both sides at the trained grid
    patch = pos_embed[0, num_prefix:].double().reshape(m, m, dim)
    out = torch.einsum(
        "yi,ijc,xj->yxc",
        _dino_resize_matrix(h, m, trained),
        patch,
        _dino_resize_matrix(w, m, trained),
    )
    return torch.cat(
        (pos_embed[:, :num_prefix], out.reshape(1, h * w, dim).to(pos_embed.dtype)), dim=1
    )


def vit_forward_features(
    model: VisionTransformer, x: torch.Tensor, layers: int = 1
) -> torch.Tensor:
    """timm's VisionTransformer.forward_features (all tokens, after the final norm) with the
    position embeddings resized by the official DINO / DINOv2 rule (`official_pos_embed`)
    instead of timm's; the same modules, so timm checkpoints load unchanged. With `layers`
    > 1, the outputs of the last `layers` blocks, each through the final norm, concatenated
    along the channels in block order (DINO's and DINOv2's `get_intermediate_layers(n,
    norm=True)`, as their linear evaluations use them)."""
    pos_embed = model.pos_embed
    if pos_embed is None:
        raise BackboneError(
            "a ViT without position embeddings (timm's pos_embed='none') is not supported"
        )
    tokens = model.patch_embed(x)  # (B, h, w, C) with dynamic_img_size (NHWC), else (B, h*w, C)
    if tokens.ndim == 4:
        grid = (tokens.shape[1], tokens.shape[2])
        tokens = tokens.flatten(1, 2)
    else:
        p = model.patch_embed.patch_size
        grid = (x.shape[-2] // p[0], x.shape[-1] // p[1])
    prefix = [
        t.expand(tokens.shape[0], -1, -1)
        for t in (model.cls_token, model.reg_token)
        if t is not None
    ]
    if model.no_embed_class:  # position embeddings for the patches only: add, then concat
        tokens = tokens + official_pos_embed(pos_embed, 0, grid)
        tokens = torch.cat(prefix + [tokens], dim=1)
    else:  # DINO / DINOv2 (and original timm): concat, then add (the CLS token has its own)
        tokens = torch.cat(prefix + [tokens], dim=1)
        tokens = tokens + official_pos_embed(pos_embed, model.num_prefix_tokens, grid)
    tokens = model.pos_drop(tokens)
    tokens = model.patch_drop(tokens)
    tokens = model.norm_pre(tokens)
    if layers == 1:
        return model.norm(model.blocks(tokens))
    first, outs = len(model.blocks) - layers, []
    for i, block in enumerate(model.blocks):
        tokens = block(tokens)
        if i >= first:
            outs.append(model.norm(tokens))
    return torch.cat(outs, dim=-1)
