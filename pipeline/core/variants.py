"""The mask variants every prediction computes (inference.Predictor), in reading order, and
the comparison the report's headline and scatter plot make. Torch-free: the report imports it."""

from __future__ import annotations

# the linear head's patch logits upsampled by nearest-neighbour and bilinear interpolation, and
# the PAC upsampler's full-resolution logits
VARIANTS = ("linear_nearest", "linear_bilinear", "pac")
# the baseline and the model the pipeline proposes (segment and export give its masks)
BASELINE, CANDIDATE = "linear_bilinear", "pac"
