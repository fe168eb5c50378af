"""Backbone registry, forward shapes and checkpoint loading: CPU only, no network.

The checkpoints are written here, in tmp dirs, from randomly initialised models; the
features of a loaded backbone are compared with a model built directly from the same
tensors, which proves that the weights were really loaded (and normalised inputs match).
The reference forward is written out here, following DINO's and DINOv2's own code
(`prepare_tokens` / `interpolate_pos_encoding`), independently of pipeline.models.backbones.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import signal
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core import fsutil, registry  # noqa: E402
from pipeline.core.errors import BackboneError  # noqa: E402
from pipeline.core.keys import weights_identity  # noqa: E402
from pipeline.core.registry import BackboneSpec, get_spec, list_backbones  # noqa: E402
from pipeline.models import backbones, positions, weights  # noqa: E402
from pipeline.models.backbones import Backbone, create_backbone  # noqa: E402
from tests.conftest import SHALLOW_VIT_DEPTH, shallow_vits  # noqa: E402

SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"
NAMES = ["dino_vits16", "dino_vits8", "dinov2_vits14", "mobilenet_v2"]
VITS = ["dino_vits16", "dino_vits8", "dinov2_vits14"]


def images(patch: int, b: int = 2, gh: int = 2, gw: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, gh * patch, gw * patch), generator=g, dtype=torch.uint8)


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def dino_pos_embed(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINO's VisionTransformer.interpolate_pos_encoding (facebookresearch/dino; DINOv2's
    is the same with interpolate_offset=0.1, interpolate_antialias=False), written out."""
    N = pos_embed.shape[1] - 1
    if h * w == N and h == w:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    h0, w0 = h + 0.1, w + 0.1
    patch_pos_embed = torch.nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(h0 / math.sqrt(N), w0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(h0) == patch_pos_embed.shape[-2] and int(w0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def vit_reference(timm_name: str, sd: dict, x: torch.Tensor, n_last: int = 1) -> torch.Tensor:
    """Patch features of a ViT built directly from `sd` (the independent reference): DINO's
    forward (conv patch embedding, CLS token, position embeddings by DINO's rule, the
    blocks, the final norm) through the blocks of a timm model holding the same tensors.
    `n_last` > 1: DINO's get_intermediate_layers(x, n_last) (each of the last blocks' outputs
    through the final norm), concatenated along the channels. As many blocks as `sd` holds."""
    import timm

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    m = timm.create_model(timm_name, pretrained=False, num_classes=0, depth=depth)
    m.load_state_dict(sd, strict=True)
    m.eval()
    B, _, H, W = x.shape
    p = m.patch_embed.patch_size[0]
    with torch.no_grad():
        t = torch.nn.functional.conv2d(
            normalise(x), m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=p
        )
        t = t.flatten(2).transpose(1, 2)
        t = torch.cat((m.cls_token.expand(B, -1, -1), t), dim=1)
        t = t + dino_pos_embed(m.pos_embed, H // p, W // p)
        outs = []
        for i, blk in enumerate(m.blocks):
            t = blk(t)
            if i >= len(m.blocks) - n_last:
                outs.append(m.norm(t)[:, 1:])
        t = torch.cat(outs, dim=-1)
    return t.reshape(B, H // p, W // p, -1)


def timm_features(bb: Backbone, x: torch.Tensor) -> torch.Tensor:
    """timm's own forward_features (dynamic_img_size: its antialiased resize) on the backbone's
    model and input normalisation (bit for bit), patch tokens."""
    B, _, H, W = x.shape
    p = bb.spec.patch_size
    with torch.no_grad():
        t = bb.model.forward_features((x.float() - bb.mean) / bb.std)
        t = t[:, bb.model.num_prefix_tokens :]
    return t.reshape(B, H // p, W // p, -1)


def feats(bb: Backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return bb(x)


def assert_one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg, msg
    for p in parts:
        assert p in msg, msg
    return msg


@pytest.fixture(scope="module")
def random_backbones() -> dict[str, Backbone]:
    return {n: create_backbone(n, "random") for n in NAMES}


@pytest.fixture(scope="module")
def dino16_data():
    """Teacher / student state dicts for ViT-S/16 in the original DINO key format (= timm's
    key names, no head), an input batch and the reference features of each. Two blocks, not
    twelve: what these checkpoints test is their keys and layouts (see `dino16`)."""
    import timm

    torch.manual_seed(123)
    m = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, depth=SHALLOW_VIT_DEPTH
    )
    teacher = {k: v.clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    student = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in teacher.items()}
    x = images(16)
    return {
        "teacher": teacher,
        "student": student,
        "x": x,
        "ref_teacher": vit_reference("vit_small_patch16_224", teacher, x),
        "ref_student": vit_reference("vit_small_patch16_224", student, x),
    }


@pytest.fixture()
def dino16(dino16_data, monkeypatch):
    """dino16_data, with create_backbone building its ViTs with as many blocks (the registry
    patched for this test): the checkpoint tests are about key formats, prefixes, wrappers and
    refusals, which the number of blocks does not change."""
    shallow_vits(monkeypatch)
    return dino16_data


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_specs():
    assert list_backbones() == NAMES
    expect = {
        "dino_vits16": (16, 384, "timm:vit_small_patch16_224.dino"),
        "dino_vits8": (8, 384, "timm:vit_small_patch8_224.dino"),
        "dinov2_vits14": (14, 384, "timm:vit_small_patch14_dinov2.lvd142m"),
        "mobilenet_v2": (16, 96, "torchvision:mobilenet_v2"),
    }
    for name, (patch, dim, source) in expect.items():
        spec = get_spec(name)
        assert isinstance(spec, BackboneSpec)
        assert (spec.name, spec.patch_size, spec.embed_dim, spec.source) == (
            name,
            patch,
            dim,
            source,
        )
        assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.patch_size = 3  # frozen


def test_registry_entries_carry_builder_kind_layers_and_taps():
    """One registry: each entry's builder is registered, its layers and taps are its own, and
    config takes its choices and range from it."""
    from pipeline.core.config import CHOICES, RANGES, load_config

    assert [s.name for s in registry.specs()] == NAMES
    for spec in registry.specs():
        assert spec.builder in backbones.BUILDERS, spec.name
        assert spec.kind == ("cnn" if spec.name == "mobilenet_v2" else "vit")
        assert 1 <= spec.default_layers <= spec.max_layers
    assert [registry.max_layers(n) for n in NAMES] == [12, 12, 12, 4]
    assert [registry.resolve_layers(n, 0) for n in NAMES] == [1, 1, 1, 2]
    mnv2 = get_spec("mobilenet_v2")
    assert mnv2.taps == (13, 16, 17, 18) and [mnv2.channels(n) for n in (1, 2, 3, 4)] == [
        96,
        256,
        576,
        1856,
    ]
    assert get_spec("dino_vits8").channels(3) == 3 * 384
    for name in VITS:  # the official releases whose key formats are read
        spec = get_spec(name)
        assert spec.checkpoint_url.startswith("https://dl.fbaipublicfiles.com/dino")
        assert spec.checkpoint_url.endswith("/" + spec.checkpoint_hint)
    assert CHOICES["backbone.name"] == tuple(NAMES)
    assert (RANGES["backbone.layers"].lo, RANGES["backbone.layers"].hi) == (0, 12)
    with pytest.raises(ValueError):  # a name is registered once
        registry.register(get_spec("dino_vits16"))
    with pytest.raises(ValueError):  # a CNN's taps are its layers
        dataclasses.replace(mnv2, taps=(13, 16))
    assert load_config(overrides=["backbone.name=dinov2_vits14"]).backbone.name == "dinov2_vits14"


def test_the_registry_and_config_import_no_torch():
    """`config show` validates against the registry: its data (and config) load without torch
    (or timm, torchvision)."""
    import subprocess

    code = (
        "import sys; import pipeline.core.config, pipeline.core.registry; "
        "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_unknown_name():
    with pytest.raises(BackboneError) as e:
        get_spec("resnet50")
    assert_one_line(e, "resnet50", *NAMES)
    with pytest.raises(BackboneError):
        create_backbone("resnet50", "random")


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", NAMES)
def test_random_forward_shapes(random_backbones, name):
    bb = random_backbones[name]
    spec = bb.spec
    assert bb.spec is get_spec(name)
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())
    p = spec.patch_size
    x = images(p, b=2, gh=2, gw=3)
    out = feats(bb, x)
    assert out.shape == (2, 2, 3, spec.embed_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert bb.feature_shape(2 * p, 3 * p) == (2, 3, spec.embed_dim)
    # another size (ViT position embeddings are interpolated)
    assert feats(bb, images(p, b=1, gh=3, gw=1)).shape == (1, 3, 1, spec.embed_dim)
    with pytest.raises(ValueError):
        bb(torch.zeros(1, 3, 2 * p + 1, 3 * p, dtype=torch.uint8))
    with pytest.raises(ValueError):
        bb.feature_shape(2 * p, 3 * p - 1)


def test_forward_rejects_bad_input(random_backbones):
    bb = random_backbones["mobilenet_v2"]
    with pytest.raises(ValueError):
        bb(torch.zeros(1, 3, 32, 32))  # float, not uint8
    with pytest.raises(ValueError):
        bb(torch.zeros(1, 4, 32, 32, dtype=torch.uint8))  # 4 channels


def test_random_is_deterministic_and_keeps_global_rng(random_backbones):
    state = torch.get_rng_state()
    again = create_backbone("mobilenet_v2", "random")
    assert torch.equal(torch.get_rng_state(), state)
    x = images(16)
    assert torch.equal(feats(again, x), feats(random_backbones["mobilenet_v2"], x))


@pytest.mark.parametrize("name", VITS)
def test_vit_forward_matches_timm(random_backbones, monkeypatch, name):
    """At other sizes than the trained one the features follow DINO's rule (the reference
    written out here), no longer timm's antialiased resize: on the real 12-block model, the
    numerics that matter. At the trained size (no position-embedding resize) the features are
    timm's own forward_features, bit for bit: patch tokens after the final norm, CLS dropped,
    row-major h x w. Bit identity is the same code path whatever the number of blocks, and the
    trained grid is what costs (37 x 37 tokens for DINOv2), so that half runs on 2 blocks."""
    bb = random_backbones[name]
    assert len(bb.model.blocks) == 12
    p = bb.spec.patch_size
    x = images(p, b=1, gh=5, gw=7)
    out = feats(bb, x)
    model_name = bb.spec.source[5:].split(".")[0]
    torch.testing.assert_close(out, vit_reference(model_name, bb.model.state_dict(), x))
    assert (out - timm_features(bb, x)).abs().max() > 1e-3

    shallow_vits(monkeypatch)
    bb = create_backbone(name, "random")
    assert len(bb.model.blocks) == SHALLOW_VIT_DEPTH
    gh, gw = bb.model.patch_embed.grid_size
    trained_grid = {"dino_vits16": (14, 14), "dino_vits8": (28, 28), "dinov2_vits14": (37, 37)}
    assert (gh, gw) == trained_grid[name]
    x = images(p, b=2, gh=gh, gw=gw)  # 224 x 224, or 518 x 518 for DINOv2
    out = feats(bb, x)
    assert out.shape == (2, gh, gw, 384)
    assert torch.equal(out, timm_features(bb, x))


def bicubic_by_hand(grid: torch.Tensor, scale: tuple[float, float], out_hw: tuple[int, int]):
    """Bicubic resampling of a (M, M, C) grid as PyTorch defines it for a given scale factor
    (align_corners=False, no antialias): output pixel i samples the input at
    (i + 0.5) / scale - 0.5, Keys cubic kernel (A = -0.75), indices clamped at the border."""
    A = -0.75

    def weights(t: float) -> list[float]:
        def near(d):
            return ((A + 2) * d - (A + 3)) * d * d + 1

        def far(d):
            return ((A * d - 5 * A) * d + 8 * A) * d - 4 * A

        return [far(t + 1), near(t), near(1 - t), far(2 - t)]

    def taps(n_out: int, s: float, n_in: int) -> list[list[tuple[int, float]]]:
        rows = []
        for i in range(n_out):
            src = (i + 0.5) / s - 0.5
            i0 = math.floor(src)
            rows.append(
                [(min(max(i0 - 1 + k, 0), n_in - 1), wk) for k, wk in enumerate(weights(src - i0))]
            )
        return rows

    g = grid.double()
    M = g.shape[0]
    out = torch.zeros(out_hw[0], out_hw[1], g.shape[-1], dtype=torch.float64)
    for i, row in enumerate(taps(out_hw[0], scale[0], M)):
        for j, col in enumerate(taps(out_hw[1], scale[1], M)):
            for yi, wy in row:
                for xi, wx in col:
                    out[i, j] += wy * wx * g[yi, xi]
    return out


def test_pos_embed_follows_dino_rule(random_backbones):
    """ViT-S/16 (trained grid 14 x 14) on 5 x 7 patches: the position embeddings are resized
    with scale factors (5.1 / 14, 7.1 / 14), not to the exact size, and without antialiasing;
    the CLS entry is kept; at the trained grid they are untouched."""
    model = random_backbones["dino_vits16"].model
    pos = model.pos_embed.detach()
    got = positions.official_pos_embed(pos, 1, (5, 7))
    assert got.shape == (1, 1 + 35, 384) and got.dtype == torch.float32
    assert torch.equal(got[:, 0], pos[:, 0])
    torch.testing.assert_close(got, dino_pos_embed(pos, 5, 7), rtol=0, atol=1e-6)
    by_hand = bicubic_by_hand(pos[0, 1:].reshape(14, 14, 384), (5.1 / 14, 7.1 / 14), (5, 7))
    torch.testing.assert_close(got[0, 1:].double(), by_hand.reshape(35, 384), rtol=0, atol=1e-6)
    # neither timm's resize (exact size, antialiased) nor a plain resize to the size
    from timm.layers import resample_abs_pos_embed

    timm_pos = resample_abs_pos_embed(pos, new_size=(5, 7), old_size=(14, 14), num_prefix_tokens=1)
    assert (got - timm_pos).abs().max() > 1e-3
    sized = torch.nn.functional.interpolate(
        pos[:, 1:].reshape(1, 14, 14, 384).permute(0, 3, 1, 2), size=(5, 7), mode="bicubic"
    )
    assert (got[0, 1:] - sized[0].permute(1, 2, 0).reshape(35, 384)).abs().max() > 1e-3
    assert positions.official_pos_embed(pos, 1, (14, 14)) is pos
    # and the whole forward on 5 x 7 patches
    x = images(16, b=2, gh=5, gw=7)
    torch.testing.assert_close(
        feats(random_backbones["dino_vits16"], x),
        vit_reference("vit_small_patch16_224", model.state_dict(), x),
    )


# ----------------------------------------------------------------------------- checkpoints


def test_load_dino_release_checkpoint(tmp_path, dino16):
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(dino16["teacher"], path)
    bb = create_backbone("dino_vits16", str(path))
    out = feats(bb, dino16["x"])
    torch.testing.assert_close(out, dino16["ref_teacher"])
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())


def dino_training_checkpoint(dino16) -> dict:
    """The layout of DINO's checkpoint.pth (main_dino.py): student / teacher wrapped in
    MultiCropWrapper (+ DDP for the student), optimizer, epoch, args, dino_loss."""
    teacher = {"backbone." + k: v for k, v in dino16["teacher"].items()}
    teacher["head.mlp.0.weight"] = torch.randn(2048, 384)
    teacher["head.last_layer.weight_g"] = torch.ones(65536, 1)
    student = {"module.backbone." + k: v for k, v in dino16["student"].items()}
    student["module.head.mlp.0.weight"] = torch.randn(2048, 384)
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
        "param_groups": [{"lr": 0.0005, "weight_decay": 0.04, "params": [0]}],
    }
    return {
        "student": student,
        "teacher": teacher,
        "optimizer": optimizer,
        "epoch": 3,
        "args": argparse.Namespace(
            arch="vit_small",
            patch_size=16,
            lr=0.0005,
            out_dim=65536,
            data_path="/path/to/imagenet/train/",
        ),
        "dino_loss": {"center": torch.zeros(1, 65536)},
    }


def test_load_dino_training_checkpoint_prefers_teacher(tmp_path, dino16):
    path = tmp_path / "checkpoint.pth"
    # argparse.Namespace as in DINO's checkpoints: allowed, and only for this load
    torch.save(dino_training_checkpoint(dino16), path)
    out = feats(create_backbone("dino_vits16", str(path)), dino16["x"])
    torch.testing.assert_close(out, dino16["ref_teacher"])
    assert not torch.allclose(out, dino16["ref_student"], atol=1e-3)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # not process-wide


class _OpenMarker:
    """Unpickling this calls open(marker, "w"): creates an empty file, nothing worse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class _ExecMarker(_OpenMarker):
    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize(
    "payload,where", [(_OpenMarker, "top"), (_ExecMarker, "top"), (_OpenMarker, "args")]
)
def test_malicious_checkpoint_is_refused_unexecuted(tmp_path, dino16, payload, where):
    """A pickle that runs code when loaded: refused in one line, the code never runs (no
    fallback to an unsafe load), even hidden in the allowed argparse.Namespace."""
    marker = tmp_path / "pwned"
    if where == "top":
        ckpt = {**dino16["teacher"], "extra": payload(marker)}
    else:
        ckpt = dino_training_checkpoint(dino16)
        ckpt["args"] = argparse.Namespace(arch="vit_small", hook=payload(marker))
    path = tmp_path / "shared_checkpoint.pth"
    torch.save(ckpt, path)
    assert not marker.exists()
    with pytest.raises(BackboneError) as e:
        create_backbone("dino_vits16", str(path))
    glob = "exec" if payload is _ExecMarker else "open"
    msg = assert_one_line(
        e,
        "shared_checkpoint.pth",
        "refused",
        "unpickling arbitrary objects",
        "Unsupported global: GLOBAL",
        glob,
        ".safetensors",
        "state dict",
    )
    assert len(msg) < 500
    assert not marker.exists()
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_load_safetensors(tmp_path, dino16):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(dino16["teacher"], str(path))
    torch.testing.assert_close(
        feats(create_backbone("dino_vits16", str(path)), dino16["x"]), dino16["ref_teacher"]
    )
    # the same key normalisation as for torch checkpoints: prefixes stripped, heads dropped;
    # recognised by content as well as by suffix
    sd = {"module.backbone." + k: v for k, v in dino16["student"].items()}
    sd["head.weight"], sd["head.bias"] = torch.zeros(1000, 384), torch.zeros(1000)
    odd = tmp_path / "student.bin"
    save_file(sd, str(odd))
    torch.testing.assert_close(
        feats(create_backbone("dino_vits16", str(odd)), dino16["x"]), dino16["ref_student"]
    )


def test_damaged_safetensors(tmp_path, dino16):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(dino16["teacher"], str(path))
    data = path.read_bytes()
    for n in (len(data) // 2, 5, 0):
        path.write_bytes(data[:n])
        with pytest.raises(BackboneError) as e:
            create_backbone("dino_vits16", str(path))
        assert_one_line(e, "model.safetensors")


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_load_wrapped_timm_state_dict(tmp_path, dino16, wrapper):
    sd = {"module." + k: v for k, v in dino16["student"].items()}
    sd["head.weight"], sd["head.bias"] = torch.zeros(1000, 384), torch.zeros(1000)
    path = tmp_path / "wrapped.pt"
    torch.save({wrapper: sd, "epoch": 1}, path)
    torch.testing.assert_close(
        feats(create_backbone("dino_vits16", str(path)), dino16["x"]), dino16["ref_student"]
    )


def test_load_dinov2_original_checkpoint(tmp_path, monkeypatch):
    """DINOv2's own release layout (its mask_token dropped): key formats, so 2 blocks."""
    shallow_vits(monkeypatch)
    src = create_backbone("dinov2_vits14", "random").model
    assert len(src.blocks) == SHALLOW_VIT_DEPTH
    g = torch.Generator().manual_seed(3)
    sd = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in src.state_dict().items()}
    x = images(14)
    ref = vit_reference("vit_small_patch14_dinov2", sd, x)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save({**sd, "mask_token": torch.zeros(1, 384)}, path)
    torch.testing.assert_close(feats(create_backbone("dinov2_vits14", str(path)), x), ref)


@pytest.fixture(scope="module")
def mobilenet_full():
    import torchvision

    torch.manual_seed(5)
    m = torchvision.models.mobilenet_v2(weights=None).eval()
    # non-trivial BatchNorm statistics, so that loading them is checked too
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    x = images(16)
    with torch.no_grad():
        ref = m.features[:14](normalise(x)).permute(0, 2, 3, 1)
    return m.state_dict(), x, ref


@pytest.mark.parametrize("layout", ["full", "features", "features14"])
def test_load_mobilenet_state_dicts(tmp_path, mobilenet_full, layout):
    sd, x, ref = mobilenet_full
    if layout == "features":  # as in shared/weights/mobilenet_v2_imagenet_features.pt
        sd = {k: v for k, v in sd.items() if k.startswith("features.")}
    elif layout == "features14":  # someone saved model.features[:14].state_dict()
        sd = {
            k[len("features.") :]: v
            for k, v in sd.items()
            if k.startswith("features.") and int(k.split(".")[1]) < 14
        }
    path = tmp_path / f"mobilenet_{layout}.pth"
    torch.save(sd, path)
    torch.testing.assert_close(feats(create_backbone("mobilenet_v2", str(path)), x), ref)


# ----------------------------------------------------------------------------- bad files


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"this is not a checkpoint\x00\x01" * 50)
    with pytest.raises(BackboneError) as e:
        create_backbone("mobilenet_v2", str(path))
    assert_one_line(e, "corrupt.pth")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(BackboneError) as e:
        create_backbone("mobilenet_v2", str(empty))
    assert_one_line(e, "empty.pth")
    for legacy in (False, True):  # a truncated zip checkpoint, a truncated legacy one
        cut = tmp_path / f"truncated_{legacy}.pth"
        torch.save({"w": torch.zeros(1000)}, cut, _use_new_zipfile_serialization=not legacy)
        cut.write_bytes(cut.read_bytes()[:-100])
        with pytest.raises(BackboneError) as e:
            create_backbone("mobilenet_v2", str(cut))
        assert_one_line(e, cut.name)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(BackboneError) as e:
        create_backbone("mobilenet_v2", str(path))
    assert_one_line(e, "tensor.pt")


def test_wrong_patch_size(tmp_path, random_backbones):
    path = tmp_path / "dino_deitsmall8_pretrain.pth"
    torch.save(random_backbones["dino_vits8"].model.state_dict(), path)
    with pytest.raises(BackboneError) as e:
        create_backbone("dino_vits16", str(path))
    assert_one_line(e, "dino_deitsmall8_pretrain.pth", "patch_embed.proj.weight")


def test_missing_and_unexpected_keys(tmp_path, dino16, mobilenet_full):
    sd = dict(dino16["teacher"])
    del sd["norm.weight"], sd["blocks.1.attn.qkv.weight"]
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(BackboneError) as e:
        create_backbone("dino_vits16", str(path))
    assert_one_line(e, "partial.pth", "missing", "norm.weight", "blocks.1.attn.qkv.weight")

    path = tmp_path / "extra.pth"
    torch.save({**dino16["teacher"], "decoder.weight": torch.zeros(2)}, path)
    with pytest.raises(BackboneError) as e:
        create_backbone("dino_vits16", str(path))
    assert_one_line(e, "extra.pth", "unexpected", "decoder.weight")

    # a checkpoint of the wrong family
    path = tmp_path / "mobilenet.pth"
    torch.save(mobilenet_full[0], path)
    with pytest.raises(BackboneError) as e:
        create_backbone("dino_vits16", str(path))
    assert_one_line(e, "mobilenet.pth")


def test_missing_path(tmp_path):
    path = tmp_path / "nowhere" / "dino_deitsmall16_pretrain.pth"
    with pytest.raises(BackboneError) as e:
        create_backbone("dino_vits16", str(path))
    assert_one_line(e, "dino_deitsmall16_pretrain.pth")
    with pytest.raises(BackboneError) as e:
        weights_identity(str(path))
    assert_one_line(e, "dino_deitsmall16_pretrain.pth")


# ----------------------------------------------------------------------------- pretrained


@pytest.mark.parametrize(
    "name,hint",
    [
        ("dino_vits16", "dino_deitsmall16_pretrain.pth"),
        ("dino_vits8", "dino_deitsmall8_pretrain.pth"),
        ("dinov2_vits14", "dinov2_vits14_pretrain.pth"),
        ("mobilenet_v2", "mobilenet_v2"),
    ],
)
def test_pretrained_offline_is_one_line(monkeypatch, name, hint):
    import timm
    import torchvision

    calls = []

    def offline(*args, **kwargs):
        calls.append(kwargs)
        raise urllib.error.URLError("[Errno -2] Name or service not known\nsecond line\n  tb")

    def offline_timm(model_name, pretrained=False, **kwargs):
        assert pretrained is True and kwargs["num_classes"] == 0 and kwargs["dynamic_img_size"]
        offline(model_name, **kwargs)

    def offline_torchvision(weights_enum, *args, **kwargs):
        offline(*args, weights=weights_enum, **kwargs)

    monkeypatch.setattr(weights, "_resolves", lambda host: True)  # reach the mocked download
    monkeypatch.setattr(timm, "create_model", offline_timm)
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline_torchvision)
    with pytest.raises(BackboneError) as e:
        create_backbone(name, "pretrained")
    msg = assert_one_line(e, "backbone.weights", name, hint, "URLError", "could not download")
    assert "second line" not in msg
    assert calls
    if name == "mobilenet_v2":  # torchvision's weights, downloaded and read safely
        assert calls[0]["weights"] == torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
        assert calls[0]["weights_only"] is True and calls[0]["check_hash"] is True


def test_pretrained_mobilenet_is_loaded(monkeypatch, mobilenet_full):
    """The downloaded torchvision state dict (here: served by a stub) ends up in the model."""
    import torchvision

    sd, x, ref = mobilenet_full
    monkeypatch.setattr(weights, "_resolves", lambda host: True)
    monkeypatch.setattr(
        torchvision.models._api.WeightsEnum,
        "get_state_dict",
        lambda self, *a, **k: {k_: v.clone() for k_, v in sd.items()},
    )
    torch.testing.assert_close(feats(create_backbone("mobilenet_v2", "pretrained"), x), ref)


# ----------------------------------------------------------------------------- identity


def test_weights_identity(tmp_path, monkeypatch):
    assert weights_identity("pretrained") == "pretrained"
    assert weights_identity("random") == "random"
    path = tmp_path / "w.pth"
    path.write_bytes(b"abc" * 1000)
    ident = weights_identity(str(path))
    assert ident == "sha256:" + hashlib.sha256(b"abc" * 1000).hexdigest()

    # memoised (fsutil.FileHasher, the one sha256 memo): a repeated call does not read the
    # file again
    def no_read(*a, **k):
        raise AssertionError("file re-read")

    monkeypatch.setattr(fsutil, "sha256_file", no_read)
    assert weights_identity(str(path)) == ident
    monkeypatch.undo()

    path.write_bytes(b"abd" * 1000)  # same size: the mtime tells
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    changed = weights_identity(str(path))
    assert changed != ident and changed == "sha256:" + hashlib.sha256(b"abd" * 1000).hexdigest()


@pytest.fixture
def no_hang():
    """Fail instead of waiting forever: opening a FIFO without a writer blocks."""

    def timeout(*_):
        raise AssertionError("blocked: the weights path was opened")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize(
    "kind", ["folder", "fifo", "dev_null", "dev_zero", "link_to_fifo", "missing", "missing_parent"]
)
def test_weights_path_that_is_not_a_file(tmp_path, kind, no_hang):
    """backbone.weights naming a folder, a FIFO or a device is told as such, in one line, by
    both the feature key (weights_identity) and the builder, without opening it; "not found"
    only when nothing is there."""
    path = {
        "folder": tmp_path,
        "fifo": tmp_path / "w.fifo",
        "dev_null": Path("/dev/null"),
        "dev_zero": Path("/dev/zero"),
        "link_to_fifo": tmp_path / "link.pth",
        "missing": tmp_path / "none.pth",
        "missing_parent": tmp_path / "none" / "w.pth",
    }[kind]
    if kind in ("fifo", "link_to_fifo"):
        os.mkfifo(tmp_path / "w.fifo")
    if kind == "link_to_fifo":
        path.symlink_to(tmp_path / "w.fifo")
    if kind.startswith("dev") and not path.exists():
        pytest.skip(f"{path} absent")
    want = {
        "folder": "is a folder, not a weights file",
        "fifo": "is not a regular file (a FIFO",
        "link_to_fifo": "is not a regular file (a FIFO",
        "missing": "weights file not found",
        "missing_parent": "weights file not found",
    }.get(kind, "is not a regular file (a FIFO")
    for call in (
        lambda: weights_identity(str(path)),
        lambda: create_backbone("mobilenet_v2", str(path)),
    ):
        with pytest.raises(BackboneError) as e:
            call()
        msg = assert_one_line(e, str(path), want)
        assert ("not found" in msg) == kind.startswith("missing"), msg


# ----------------------------------------------------------------------------- shared weights


def test_shared_mobilenet_weights():
    path = SHARED_WEIGHTS / "mobilenet_v2_imagenet_features.pt"
    if not path.is_file():
        pytest.skip(f"{path} not present (see the shared weights README)")
    bb = create_backbone("mobilenet_v2", str(path))
    out = feats(bb, torch.zeros(1, 3, 480, 848, dtype=torch.uint8))
    assert out.shape == (1, 30, 53, 96) and torch.isfinite(out).all()
    assert weights_identity(str(path)).startswith("sha256:")


def test_pretrained_fails_fast_when_the_hub_does_not_resolve(monkeypatch):
    """Offline machines get the one-line error at once, not after minutes of retries: the
    hub's host is looked up once (is it reachable at all?), then the weights are looked for in
    the hub's offline mode (the local cache only), which never looks the host up again: no
    connection attempt, hence no retry. Counted, not timed."""
    import socket

    lookups = []

    def no_dns(host, *a, **k):
        lookups.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(BackboneError) as e:
        create_backbone("dino_vits16", "pretrained")
    assert lookups == ["huggingface.co"]
    assert_one_line(e, "could not download", "backbone.weights")


# ----------------------------------------------------------------------------- backbone.layers


def test_vit_layers_are_dinos_intermediate_layers_concatenated(tmp_path, monkeypatch):
    """backbone.layers = 4: the last four blocks' outputs, each through the final norm. Which
    blocks are taken does not depend on the depth as long as there are more than four, so the
    ViT has 6 blocks (the first four are then not the last four)."""
    import timm

    depth = 6
    shallow_vits(monkeypatch, depth)
    torch.manual_seed(321)
    teacher = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, depth=depth
    ).state_dict()
    path = tmp_path / "teacher.pth"
    torch.save(teacher, path)
    x = images(16, gh=3, gw=5)
    bb = create_backbone("dino_vits16", str(path), layers=4)
    assert len(bb.model.blocks) == depth
    out = feats(bb, x)
    assert out.shape == (2, 3, 5, 4 * 384) and bb.feature_shape(48, 80) == (3, 5, 1536)
    torch.testing.assert_close(out, vit_reference("vit_small_patch16_224", teacher, x, 4))
    # the last 384 channels are the one-layer features
    torch.testing.assert_close(out[..., -384:], feats(create_backbone("dino_vits16", str(path)), x))


def test_mobilenet_layers_are_later_stages_kept_at_stride_16(tmp_path):
    """Layers 2-4 add the 160, 320 and 1280-channel stages with their stride-2 convolution
    replaced by dilation. Checked against torchvision's own (strided) network: a dilated
    ("a trous") output at even positions equals the strided output, exactly in exact
    arithmetic, whatever the weights."""
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.mobilenet_v2(weights=None).features.eval()
    for m in ref.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = images(32, gh=3, gw=4)  # a 6 x 8 grid at stride 16, 3 x 4 at stride 32
    with torch.no_grad():
        h = normalise(x)
        outs = {}
        for i, block in enumerate(ref):
            h = block(h)
            outs[i] = h
    path = tmp_path / "mnv2.pth"
    torch.save({f"features.{k}": v for k, v in ref.state_dict().items()}, path)
    bbs = {n: create_backbone("mobilenet_v2", str(path), layers=n) for n in (1, 2, 3, 4)}
    f = {n: feats(bb, x) for n, bb in bbs.items()}
    assert [t.shape[-1] for t in f.values()] == [96, 256, 576, 1856]
    assert all(t.shape[1:3] == (6, 8) for t in f.values())
    torch.testing.assert_close(f[1], outs[13].permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    for n, (tap, lo, hi) in {2: (16, 96, 256), 3: (17, 256, 576), 4: (18, 576, 1856)}.items():
        torch.testing.assert_close(
            f[4][:, ::2, ::2, lo:hi], outs[tap].permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(f[n], f[4][..., :hi])


def test_layers_beyond_the_backbone_are_a_usage_error():
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        create_backbone("mobilenet_v2", "random", layers=5)
    assert_one_line(err, "backbone.layers", "1 to 4")
    with pytest.raises(ConfigError):
        create_backbone("dino_vits16", "random", layers=13)
