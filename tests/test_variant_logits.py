"""models.variant_logits: every variant of core.variants computed from the models, a refined
variant as its refiner on its source's (flip-averaged) logits with the [refine] settings, and
each variant's seconds recorded per image."""

from __future__ import annotations

import torch

from pipeline.core.config import RefineCfg
from pipeline.core.keys import RefineKey
from pipeline.core.variants import REFINED, VARIANTS
from pipeline.models.heads import LinearHead, PacUpsampler, TrainedModels, UpsamplerSpec
from pipeline.models.refine import refine_logits
from pipeline.models.variant_logits import VariantSeconds, variant_logits

C, P = 6, 8  # channels, patch size


def _models() -> TrainedModels:
    torch.manual_seed(0)
    head = LinearHead(C).eval()
    up = PacUpsampler(UpsamplerSpec(C, P, residual=True)).eval()
    return TrainedModels(head, up, P, "test", {}, {})


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn((2, C, 3, 4), generator=g)
    img = torch.randint(0, 256, (2, 3, 3 * P, 4 * P), dtype=torch.uint8, generator=g)
    return f, img


@torch.inference_mode()
def test_refined_variants_refine_their_source_with_the_configured_settings():
    models, (f, img) = _models(), _inputs()
    refine = RefineKey.of({**RefineCfg().__dict__, "guided_radius": 3, "crf_iterations": 2})
    timing = VariantSeconds()
    out = variant_logits(models, f, img, VARIANTS, refine=refine, timing=timing)
    assert set(out) == set(VARIANTS) == set(timing.seconds) and timing.images == 2
    assert torch.equal(out["pac"], models.upsampler(f, img, models.head(f)))
    for v, (source, refiner) in REFINED.items():
        want = refine_logits(refiner, out[source], img, **refine.kwargs(refiner))
        assert torch.equal(out[v], want), v
        assert not torch.equal(out[v], out[source]), v  # the refiner did something
        assert timing.seconds[v] >= timing.seconds[source]  # its source's time included


@torch.inference_mode()
def test_a_refined_variant_refines_the_flip_averaged_source():
    models, (f, img) = _models(), _inputs()
    mirrored = _inputs(seed=1)[0]
    refine = RefineKey.of(RefineCfg().__dict__)
    both = variant_logits(models, f, img, ("pac", "pac_guided"), mirrored, refine)
    alone = variant_logits(models, f, img, ("pac_guided",), mirrored, refine)
    want = refine_logits("guided", both["pac"], img, **refine.kwargs("guided"))
    assert torch.equal(alone["pac_guided"], want) and torch.equal(both["pac_guided"], want)


def test_refine_key_gives_each_refiner_its_arguments_and_the_record_params():
    refine = RefineKey.of(RefineCfg().__dict__)
    assert refine.kwargs("guided") == {"radius": 32, "eps": 1e-4, "subsample": 2}
    assert set(refine.kwargs("crf")) >= {"iterations", "scale", "appearance_weight"}
    assert set(refine.params()) == {f"refine.{k}" for k in RefineCfg().__dict__}
    assert set(refine.params("guided")) == {f"refine.guided_{k}" for k in refine.kwargs("guided")}
