"""The mask variants every prediction computes (inference.Predictor), in reading order, and
the comparison the report's headline and scatter plot make. Torch-free: the report imports it.
The one list of variants: whatever is per variant (metrics, thresholds, timing) keys on it."""

from __future__ import annotations

# the linear head's patch logits upsampled by nearest-neighbour and bilinear interpolation, the
# PAC upsampler's full-resolution logits, and the PAC probabilities refined with the image
# (REFINED)
VARIANTS = ("linear_nearest", "linear_bilinear", "pac", "pac_crf", "pac_guided")
# a refined variant: (the variant it refines, the refiner): models.refine's dense CRF and
# guided filter (models.refine.REFINERS), their settings the config's [refine] section
# (core.keys.RefineKey)
REFINED: dict[str, tuple[str, str]] = {"pac_crf": ("pac", "crf"), "pac_guided": ("pac", "guided")}
# the baseline and the model the pipeline proposes (segment and export give its masks)
BASELINE, CANDIDATE = "linear_bilinear", "pac"
