"""The region losses of stage 2 (models/losses.py) on tiny hand-checkable inputs, and the
upsampler's bandwidth and upsample options (models/heads.py)."""

import itertools

import pytest
import torch

from pipeline.models.heads import PacUpsampler, UpsamplerSpec, upsample_x2
from pipeline.models.losses import RegionLoss, lovasz_hinge_loss, soft_dice_loss

ONES = torch.ones(4, dtype=torch.float64)


def test_dice_of_an_even_guess_is_hand_computed():
    # p = 0.5 everywhere, target [1, 0]: 1 - (2 x 0.5 + 1) / (1 + 1 + 1)
    loss = soft_dice_loss(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.ones(2))
    assert loss.item() == pytest.approx(1 / 3)


def test_dice_of_a_perfect_mask_is_zero():
    target = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    logits = (2 * target - 1) * 100
    assert soft_dice_loss(logits, target, ONES).item() == pytest.approx(0, abs=1e-12)
    # all wrong: 1 - (0 + 1) / (2 + 2 + 1)
    assert soft_dice_loss(logits, 1 - target, ONES).item() == pytest.approx(0.8)


def test_dice_ignores_pixels_of_weight_zero():
    target = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    logits = torch.tensor([100.0, -100.0, 100.0, 100.0], dtype=torch.float64)  # last wrong
    w = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    assert soft_dice_loss(logits, target, w).item() == pytest.approx(0, abs=1e-12)
    assert soft_dice_loss(logits, target, ONES).item() == pytest.approx(1 - 5 / 6)


def test_lovasz_at_unit_errors_is_the_jaccard_loss():
    # errors 1 - logit x sign: [0, 1, 0, 1]; the mispredicted set M = {1, 3}, the object
    # {0, 1}: |M| / |object u M| = 2 / 3
    target = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    logits = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=torch.float64)
    assert lovasz_hinge_loss(logits, target, ONES).item() == pytest.approx(2 / 3)
    # right beyond the margin everywhere: no loss
    assert lovasz_hinge_loss(3 * (2 * target - 1), target, ONES).item() == 0


def _jaccard_loss(wrong: set[int], positives: set[int]) -> float:
    return len(wrong) / len(positives | wrong) if wrong else 0.0


def test_lovasz_matches_the_extension_computed_from_its_definition():
    """sum over the pixels by decreasing error of error x (the Jaccard loss of the pixels
    so far - of those before), the Jaccard loss counted on sets."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, generator=g, dtype=torch.float64) * 2
    target = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.float64)
    errors = (1 - logits * (2 * target - 1)).tolist()
    order = sorted(range(7), key=lambda i: -errors[i])
    positives = {i for i in range(7) if target[i] == 1}
    expected, before = 0.0, 0.0
    for n in range(1, 8):
        now = _jaccard_loss(set(order[:n]), positives)
        expected += max(errors[order[n - 1]], 0.0) * (now - before)
        before = now
    assert lovasz_hinge_loss(logits, target, torch.ones(7)).item() == pytest.approx(expected)


def test_lovasz_keeps_only_pixels_of_positive_weight_and_binarises_soft_targets():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=torch.float64)
    soft = torch.tensor([0.9, 0.6, 0.2, 0.4], dtype=torch.float64)  # -> [1, 1, 0, 0]
    assert lovasz_hinge_loss(logits, soft, ONES).item() == pytest.approx(2 / 3)
    w = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)  # pixel 3 left out: 1 / 2
    assert lovasz_hinge_loss(logits, soft, w).item() == pytest.approx(1 / 2)
    empty = lovasz_hinge_loss(logits.requires_grad_(), soft, torch.zeros(4))
    assert empty.item() == 0 and empty.requires_grad


@pytest.mark.parametrize("kind", ["dice", "lovasz"])
def test_region_loss_gradients_are_finite_and_scaled_by_the_weight(kind):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 6, 5, generator=g, requires_grad=True)
    target = (torch.rand(2, 1, 6, 5, generator=g) > 0.5).float()
    loss = RegionLoss(kind, 2.0)(logits, target, torch.ones_like(target))
    assert isinstance(loss, torch.Tensor)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
    single = RegionLoss(kind, 1.0)(logits, target, torch.ones_like(target))
    assert loss.item() == pytest.approx(2 * float(single.detach()))


def test_no_region_loss_adds_nothing_and_an_unknown_one_is_refused():
    assert RegionLoss()(torch.zeros(3), torch.ones(3), torch.ones(3)) == 0.0
    with pytest.raises(ValueError, match="focal"):
        RegionLoss("focal")


# ----------------------------------------------------------------------------- upsampler


def test_transposed_x2_puts_the_input_at_the_even_pixels():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    z = upsample_x2(x, (4, 6), "transposed")
    assert torch.equal(z[..., ::2, ::2], x)
    assert z.sum() == x.sum() and z.shape == (1, 1, 4, 6)
    bilinear = upsample_x2(x, (4, 6), "bilinear")
    assert bilinear.shape == (1, 1, 4, 6) and (bilinear[..., 1::2, 1::2] != 0).all()


@pytest.mark.parametrize(
    "bandwidth, upsample", list(itertools.product(["fixed", "learned"], ["bilinear", "transposed"]))
)
def test_upsampler_options_have_their_parameters_and_train(bandwidth, upsample):
    torch.manual_seed(0)
    spec = UpsamplerSpec(in_channels=5, patch_size=8, bandwidth=bandwidth, upsample=upsample)
    up = PacUpsampler(spec)
    names = dict(up.named_parameters())
    assert ("log_bandwidth" in names) == (bandwidth == "learned")
    if bandwidth == "learned":
        assert names["log_bandwidth"].shape == (len(up.stages),)
    k = 5 if upsample == "transposed" else 3
    assert all(s.weight.shape[-1] == k for s in up.stages)
    image = torch.randint(0, 255, (1, 3, 16, 24), dtype=torch.uint8)
    out = up(torch.randn(1, 5, 2, 3), image)
    assert out.shape == (1, 1, 16, 24)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in up.parameters())
    if bandwidth == "learned":
        assert names["log_bandwidth"].grad.abs().sum() > 0


def test_a_learned_bandwidth_scales_the_guide():
    """At log scale 0 the learned bandwidth is the fixed one; another value changes the
    output exactly as a scaled guide would."""
    torch.manual_seed(0)
    fixed = PacUpsampler(UpsamplerSpec(in_channels=5, patch_size=4))
    learned = PacUpsampler(UpsamplerSpec(in_channels=5, patch_size=4, bandwidth="learned"))
    learned.load_state_dict({**fixed.state_dict(), "log_bandwidth": torch.zeros(2)})
    feats, image = torch.randn(1, 5, 3, 3), torch.randint(0, 255, (1, 3, 12, 12)).byte()
    torch.testing.assert_close(learned(feats, image), fixed(feats, image))
    with torch.no_grad():
        learned.log_bandwidth.fill_(1.0)
    assert not torch.allclose(learned(feats, image), fixed(feats, image))
