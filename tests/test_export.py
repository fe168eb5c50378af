"""`export`: one torch.export file that runs with torch alone (a process that never imports
`pipeline`), at dynamic batch and image sizes, agreeing with `segment`; the refusal of models
that do not match the config; ViT backbones export with dynamic sizes too (DINO's position
embedding resize written so that torch.export keeps the grid size symbolic)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.commands.export import (
    META_FILE,
    ExportSettings,
    SegmentationProgram,
    _example_side,
    build_program,
    export_program,
)
from pipeline.commands.segment import run_segment
from pipeline.core.errors import UsageError
from pipeline.core.layout import RunLayout
from pipeline.inference import checked_models
from pipeline.models import backbones, positions
from pipeline.models.devices import config_keys
from pipeline.models.heads import LinearHead, PacUpsampler, TrainedModels, UpsamplerSpec
from tests.conftest import (
    SHALLOW_VIT_DEPTH,
    cli_sets,
    copy_run,
    one_line_error,
    run_cli,
    shallow_vits,
    synth_images,
)

AGREEMENT = 0.999  # segment rounds features to float16 after a per-image forward; see export.py


@pytest.fixture(scope="module")
def export_run(trained, tmp_path_factory):
    """A copy of the session's trained run, for this module: export records what it wrote in
    the run folder (its stage record, the ledger), which other modules must not see."""
    return copy_run(trained, tmp_path_factory.mktemp("export_run") / "run")


@pytest.fixture(scope="module")
def exported(export_run, tmp_path_factory):
    base, root, cfg = export_run
    path = tmp_path_factory.mktemp("export") / "model.pt2"
    r = run_cli("export", "--out", str(path), *cli_sets(base, root), timeout=600)
    assert r.returncode == 0, r.stderr
    assert str(path) in r.stdout and "multiples of 16" in r.stdout
    return path


def run_isolated(code: str, cwd, *args: str) -> subprocess.CompletedProcess:
    """Python in a fresh process started outside the checkout, without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_runs_with_torch_alone_at_other_sizes(exported, tmp_path):
    code = """
        import sys, numpy as np, torch
        program = torch.export.load(sys.argv[1]).module()
        g = torch.Generator().manual_seed(1)
        for b, h, w in ((3, 96, 128), (1, 160, 48)):  # the example was (2, 3, 224, 320)
            x = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)
            with torch.no_grad():
                y = program(x)
            assert y.shape == (b, 1, h, w) and y.dtype == torch.float32, y.shape
            assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
            np.save(f"{sys.argv[2]}/{b}x{h}x{w}.npy", y.numpy())
        assert "pipeline" not in sys.modules, "pipeline was imported"
        print("ok")
    """
    r = run_isolated(code, tmp_path, str(exported), str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
    assert (tmp_path / "3x96x128.npy").is_file() and (tmp_path / "1x160x48.npy").is_file()


def test_masks_agree_with_segment(export_run, exported, tmp_path):
    """On images whose size is a multiple of the patch (no canvas crop): prob > threshold
    equals segment's mask on >= 99.9 % of the pixels."""
    base, root, cfg = export_run
    src = tmp_path / "in"
    names = [f"img{k}.png" for k in range(6)]
    synth_images(src, names, root, size=(128, 96))
    res = run_segment(cfg, [src], tmp_path / "out", overlays=False, progress=False)
    assert res.n_written == 6
    extra = {META_FILE: ""}
    program = torch.export.load(exported, extra_files=extra).module()
    meta = json.loads(extra[META_FILE])
    assert meta["patch_size"] == 16 and meta["threshold"] == cfg.predict.threshold
    images = np.stack([np.asarray(Image.open(src / n).convert("RGB")) for n in names])
    with torch.no_grad():
        prob = program(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())[:, 0].numpy()
    seg = np.stack([np.asarray(Image.open(tmp_path / "out" / n)) > 127 for n in names])
    agree = float(((prob > meta["threshold"]) == seg).mean())
    assert agree >= AGREEMENT, agree
    print(f"export vs segment: {100 * agree:.4f} % of pixels agree")


def test_up_to_date_and_refusals(export_run, exported):
    base, root, cfg = export_run
    r = run_cli("export", "--out", str(exported), *cli_sets(base, root))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"export: up-to-date -> {exported}\n", r.stdout + r.stderr
    r = run_cli(
        "export", "--out", str(exported), *cli_sets(base, root, "backbone.name=dino_vits16")
    )
    assert r.returncode == 1
    one_line_error(r, "train-head", "backbone.name")
    r = run_cli("export", *cli_sets(base, root, "run.name=untrained"))
    assert r.returncode == 1
    one_line_error(r, "no trained models", "train-head")
    r = run_cli("export", "--height", "100", *cli_sets(base, root, "run.name=default"), "--force")
    assert r.returncode == 2
    one_line_error(r, "--height 100", "multiple of the patch size 16")
    r = run_cli("export", "--height", "16", *cli_sets(base, root), "--force")  # one patch
    assert r.returncode == 2
    one_line_error(r, "--height 16", "multiple of the patch size 16 from 32 to 8192")
    for cmd in (["export", "--force"], ["segment", str(root / "test")]):  # layers it lacks
        r = run_cli(*cmd, *cli_sets(base, root, "backbone.layers=12"))
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        one_line_error(r, "backbone.layers: 12", "mobilenet_v2 offers 1 to 4")


def test_example_side_range():
    """--height/--width: multiples of the patch from 2 patches to MAX_SIDE."""
    assert _example_side(None, 14, 16, "height") == 224
    for value, patch in ((32, 16), (8192, 16), (28, 14), (8190, 14)):
        assert _example_side(value, 14, patch, "height") == value
    for value, patch in ((16, 16), (0, 16), (-32, 16), (8208, 16), (14, 14), (8204, 14), (40, 16)):
        with pytest.raises(UsageError) as e:
            _example_side(value, 14, patch, "height")
        assert str(e.value) == (
            f"--height {value}: must be a multiple of the patch size {patch} "
            f"from {2 * patch} to {8192 // patch * patch}"
        )


def test_smallest_side_works_and_one_patch_is_refused(export_run, exported):
    """The program takes sides of 2 patches (32 px) up to 8192 px, equal to the eager program
    it was exported from, and refuses one patch (16 px) with torch's guard naming the minimum,
    as its META_FILE says."""
    base, root, cfg = export_run
    extra = {META_FILE: ""}
    program = torch.export.load(exported, extra_files=extra).module()
    meta = json.loads(extra[META_FILE])
    assert (meta["min_side"], meta["max_side"]) == (32, 8192)
    assert "multiples of 16 from 32 (2 patches) to 8192" in meta["input"], meta["input"]
    with checked_models(RunLayout.of(cfg), config_keys(cfg), cfg.paths.cache) as models:
        eager = build_program(ExportSettings.of(cfg), models)
    g = torch.Generator().manual_seed(3)
    for b, h, w in ((1, 32, 32), (2, 32, 48), (1, 8192, 32), (1, 48, 32)):
        x = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)
        with torch.no_grad():
            got, want = program(x), eager(x)
        assert got.shape == (b, 1, h, w)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    for h, w, dim in ((16, 32, 2), (32, 16, 3), (16, 16, 2), (8192, 16, 3), (16, 8192, 2)):
        x = torch.zeros((1, 3, h, w), dtype=torch.uint8)
        with pytest.raises(Exception, match=re.escape(f"images.size()[{dim}] >= 32")):
            program(x)


# ----------------------------------------------------------------------------- ViT backbones


def test_exportable_pos_embed_matches_dino_rule():
    """The matrix form of DINO's resize (used while exporting) against the eager F.interpolate
    one: equal at the trained grid, within float32 rounding elsewhere."""
    torch.manual_seed(0)
    for m, prefix in ((14, 1), (37, 5)):
        pos = torch.randn(1, prefix + m * m, 32)
        for grid in ((m, m), (m, m + 6), (m + 6, m), (5, 7), (1, 1), (30, 53)):
            want = positions.official_pos_embed(pos, prefix, grid)
            got = positions._exportable_pos_embed(pos, prefix, m, grid)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=5e-5)
            if grid == (m, m):
                assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["dino_vits16", "dinov2_vits14"])
def test_vit_exports_with_dynamic_sizes(name, monkeypatch):
    """A ViT backbone with (untrained) heads: exported once, run at other sizes, including
    the trained grid (position embeddings untouched there), equal to the eager program.
    Plumbing (what torch.export keeps symbolic is the token grid, before the blocks), so the
    ViT has 2 blocks instead of 12: the same graph with fewer repeats of one block."""
    shallow_vits(monkeypatch)
    bb = backbones.create_backbone(name, "random")
    assert len(bb.model.blocks) == SHALLOW_VIT_DEPTH
    p, c = bb.spec.patch_size, bb.spec.embed_dim
    torch.manual_seed(0)
    models = TrainedModels(
        LinearHead(c).eval(),
        PacUpsampler(UpsamplerSpec(c, p, residual=True)).eval(),
        p,
        "test",
        {},
        {},
    )
    program = SegmentationProgram(bb, models, torch.float32).eval().requires_grad_(False)
    exported = export_program(program, p, 4 * p, 6 * p).module()
    trained_grid = bb.model.patch_embed.grid_size[0]
    g = torch.Generator().manual_seed(0)
    for b, gh, gw in ((1, trained_grid, trained_grid), (2, 3, 9), (1, 7, 5), (1, 2, 2), (2, 2, 6)):
        x = torch.randint(0, 256, (b, 3, gh * p, gw * p), dtype=torch.uint8, generator=g)
        with torch.no_grad():
            got, want = exported(x), program(x)
        assert got.shape == (b, 1, gh * p, gw * p)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    for gh, gw in ((1, 4), (4, 1)):  # one patch: refused, naming the two-patch minimum
        with pytest.raises(Exception, match=re.escape(f">= {2 * p}")):
            exported(torch.zeros((1, 3, gh * p, gw * p), dtype=torch.uint8))
