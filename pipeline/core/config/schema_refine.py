"""The [refine] section of the config (a section of ``schema.Config``, declared with
``meta.key`` like every other): the settings of stage 3's refinement variants pac_crf (the
dense CRF) and pac_guided (the guided filter), models.refine on the PAC probabilities with
the image. Each key `crf_X` / `guided_X` is the refiner's keyword argument `X`
(core.keys.RefineKey). Defaults chosen on held-out DAVIS-2016 *training* sequences, never on
the validation split (CHANGELOG.md)."""

from __future__ import annotations

from dataclasses import dataclass

from .meta import Range, key

__all__ = ["RefineCfg", "STALE_REFINE"]

# stage 3 writes every variant; segment and export give the candidate's masks (core.variants)
STALE_REFINE = "predict (segment and export only when the candidate variant is a refined one)"
_SEE = "design.md#refinement-variants"


@dataclass
class RefineCfg:
    crf_iterations: int = key(
        5,
        "Mean-field iterations of the dense CRF of the `pac_crf` variant (`0`: the PAC "
        "probabilities unchanged).",
        stale=STALE_REFINE,
        range=Range(0, 50),
        see=_SEE,
    )
    crf_scale: int = key(
        2,
        "The CRF runs on the image and probabilities reduced by this factor, its change of "
        "the logits upsampled to full size (`1`: full resolution, about 4x the time).",
        stale=STALE_REFINE,
        range=Range(1, 8),
    )
    crf_appearance_weight: float = key(
        5.0,
        "Weight of the CRF's appearance kernel (position and RGB): the largest logit change "
        "it makes, at a pixel whose whole neighbourhood has its colour and one sure label.",
        stale=STALE_REFINE,
        range=Range(0, 100),
    )
    crf_appearance_xy: float = key(
        20.0,
        "Spatial standard deviation of the appearance kernel, in pixels of the image.",
        stale=STALE_REFINE,
        range=Range(0, 1000, lo_open=True),
    )
    crf_appearance_rgb: float = key(
        20.0,
        "Colour standard deviation of the appearance kernel, in RGB steps (0 to 255).",
        stale=STALE_REFINE,
        range=Range(0, 1000, lo_open=True),
    )
    crf_smoothness_weight: float = key(
        0.0,
        "Weight of the CRF's smoothness kernel (position only; as the appearance weight).",
        stale=STALE_REFINE,
        range=Range(0, 100),
    )
    crf_smoothness_xy: float = key(
        3.0,
        "Spatial standard deviation of the smoothness kernel, in pixels.",
        stale=STALE_REFINE,
        range=Range(0, 100, lo_open=True),
    )
    guided_radius: int = key(
        32,
        "Window of the guided filter of the `pac_guided` variant: (2 radius + 1)^2 pixels.",
        stale=STALE_REFINE,
        range=Range(1, 256),
        see=_SEE,
    )
    guided_eps: float = key(
        1e-4,
        "Regularisation of the guided filter, in squared [0, 1] intensity units: image "
        "edges whose contrast variance is well above it are kept, flatter detail smoothed.",
        stale=STALE_REFINE,
        range=Range(0, 1, lo_open=True),
    )
    guided_subsample: int = key(
        2,
        "The fast guided filter: its coefficients computed at 1/subsample of the resolution "
        "(`1`: the exact filter).",
        stale=STALE_REFINE,
        range=Range(1, 8),
    )
