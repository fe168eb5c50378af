"""GPU readiness. The tests marked `gpu` run the CUDA path (`python -m pytest -m gpu
tests/test_gpu.py` on a machine with CUDA; skipped with a reason without one): bf16 autocast
features, stage 1 and training on CUDA, stage 3, `segment`, and the exported program moved
to CUDA. The unmarked ones run in the default suite on CPU: the exported program holds no
device that survives torch.export's `move_to_device_pass` (checked on the `meta` device), the
position-embedding resize follows its input's device, and benchmarks/gpu_check.py's JSON
writer and arguments (its CPU quick run is in .ci/run)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.commands.export import SegmentationProgram, export_program
from pipeline.models import backbones, positions
from pipeline.models.heads import LinearHead, PacUpsampler, TrainedModels, UpsamplerSpec
from tests.conftest import (
    ROOT,
    TINY_TRAIN,
    copy_run,
    make_cfg,
    shallow_vits,
    synth_images,
)

# VIT_OBJSEG_GPU_TESTS_ON=cpu runs the `gpu` tests on the CPU instead: a dry run of their
# code where no CUDA device is lent (bf16 autocast works there too)
DEVICE = os.environ.get("VIT_OBJSEG_GPU_TESTS_ON", "cuda")
CUDA = torch.cuda.is_available() or DEVICE == "cpu"
PIXELS_MIN = 0.995  # equal mask pixels, device against CPU (as benchmarks/gpu_check.py)
COSINE_MIN = 0.99  # per patch, bf16 against float32 (as benchmarks/gpu_check.py)


def needs_cuda(fn):
    """Marked `gpu` (left out of the default run) and skipped without a CUDA device."""
    reason = "needs a CUDA device (torch.cuda.is_available() is False)"
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason=reason)(fn))


def vit_program(name: str = "dino_vits16") -> tuple[SegmentationProgram, int]:
    """A (shallow, when patched) ViT backbone with untrained heads, as export builds it."""
    bb = backbones.create_backbone(name, "random")
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
    return SegmentationProgram(bb, models, torch.float16).eval().requires_grad_(False), p


def device_args(node) -> list:
    """The devices a graph node names (its kwargs, and aten.to.device's argument)."""
    found = [v for k, v in node.kwargs.items() if k == "device" and v is not None]
    if node.op == "call_function" and node.target is torch.ops.aten.to.device:
        found.append(node.args[1])
    return [torch.device(d) for d in found]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def masks_in(folder) -> dict[str, np.ndarray]:
    return {
        str(p.relative_to(folder)): np.asarray(Image.open(p)) > 127
        for p in sorted(folder.rglob("*.png"))
    }


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a and a.keys() == b.keys()
    return sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].size for k in a)


# ----------------------------------------------------------------------------- CPU, default run


def test_exportable_pos_embed_follows_its_device():
    """The export-time position-embedding resize builds its index tensors on the embeddings'
    device (torch.arange without a device would make them on the CPU and fail on any other)."""
    m, prefix = 14, 1
    pos = torch.zeros(1, prefix + m * m, 8, device="meta")
    for grid in ((m, m), (5, 7)):
        out = positions._exportable_pos_embed(pos, prefix, m, grid)
        assert out.device.type == "meta" and out.shape == (1, prefix + grid[0] * grid[1], 8)


def test_exported_program_holds_no_hard_coded_device(monkeypatch):
    """export traces on the CPU (commands/export.py: build_program, export_program), so every
    factory call in the graph names `cpu`; a program is moved to another device with
    torch.export's move_to_device_pass (docs/segment-export.md), which rewrites those. After
    the move to `meta` (standing in for cuda: any stray CPU tensor fails there as on cuda) no
    node names the CPU and the program runs on meta tensors alone."""
    import torch.export.passes

    shallow_vits(monkeypatch)
    program, p = vit_program()
    ep = export_program(program, p, 4 * p, 6 * p)
    moved = torch.export.passes.move_to_device_pass(ep, "meta")
    named = [(n.name, d) for n in moved.graph.nodes for d in device_args(n)]
    assert named, "expected the traced graph to name devices (factory calls)"
    assert all(d.type == "meta" for _, d in named), [x for x in named if x[1].type != "meta"]
    for k, v in [*moved.state_dict.items(), *moved.constants.items()]:
        assert not isinstance(v, torch.Tensor) or v.device.type == "meta", k
    with torch.no_grad():
        out = moved.module()(torch.zeros((2, 3, 5 * p, 7 * p), dtype=torch.uint8, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 1, 5 * p, 7 * p)


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_check_arguments_and_json(tmp_path, capsys):
    """The check's arguments and its JSON: rewritten whole after every step (a failed step
    recorded and the next one run), strict JSON (no NaN), `ok` only when every check holds."""
    gc = _gpu_check()
    a = gc.parse_args(["--quick", "--device", "cpu", "--out", str(tmp_path / "x.json")])
    assert a.quick and a.seconds == 1.0 and a.device == "cpu" and a.sets == []
    assert gc.parse_args([]).seconds == 20.0
    with pytest.raises(SystemExit):
        gc.parse_args(["--set", "no_equals_sign"])
    with pytest.raises(SystemExit):
        gc.parse_args(["--skip", "everything"])

    out = tmp_path / "sub" / "check.json"
    rep = gc.Report(out)
    assert json.loads(out.read_text())["complete"] is False
    with rep.step("first"):
        rep.set(forward_images_per_s=float("nan"), startup_s=1.23456789)
        rep.check("a", True, fraction=0.5)
    doc = json.loads(out.read_text())  # already on disk after the step
    assert doc["forward_images_per_s"] is None and doc["startup_s"] == 1.23457
    assert doc["checks"] == {"a": True} and doc["details"]["a"]["fraction"] == 0.5
    assert rep.ok
    with rep.step("second"):
        raise RuntimeError("boom")
    with rep.step("third"):
        rep.check("b", False)
    doc = json.loads(out.read_text())
    assert "boom" in doc["errors"]["second"] and set(doc["steps"]) == {"first", "second", "third"}
    assert doc["checks"] == {"a": True, "b": False} and not rep.ok
    assert not list(out.parent.glob(".*.tmp"))  # the temporary files renamed or removed
    lo, mean = gc.cosine_per_patch(np.ones((2, 3, 4)), np.ones((2, 3, 4)))
    assert math.isclose(lo, 1.0) and math.isclose(mean, 1.0)


def test_gpu_check_refuses_dask():
    """The check blocks dask imports, as the GPU machine has no Dask."""
    gc = _gpu_check()
    hook = gc._NoDask()
    with pytest.raises(ImportError, match="no Dask"):
        hook.find_spec("distributed.client")
    assert hook.find_spec("numpy") is None


# ----------------------------------------------------------------------------- CUDA


@needs_cuda
def test_bf16_autocast_features(monkeypatch, tmp_path, synth_root):
    """Stage 1's forward on CUDA under bf16 autocast: float16 features of the CPU float32
    shape, each patch's vector within cosine COSINE_MIN of the CPU's."""
    from pipeline.stages.extract import extractor_of

    shallow_vits(monkeypatch)
    base = ["backbone.name=dino_vits16"]
    gpu = extractor_of(
        make_cfg(tmp_path, synth_root, *base, f"extract.device={DEVICE}", "extract.precision=bf16")
    )
    cpu = extractor_of(make_cfg(tmp_path, synth_root, *base))
    assert gpu.device.type == DEVICE and gpu.amp == torch.bfloat16 and cpu.amp is None
    g = np.random.default_rng(0)
    canvases = [g.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(3)]
    got, want = gpu.launch(canvases)(), cpu.launch(canvases)()
    assert got.dtype == np.float16 and got.shape == want.shape == (3, 4, 6, 384)
    assert np.isfinite(got).all()
    assert cosines(got, want).min() >= COSINE_MIN


@needs_cuda
def test_stage1_and_training_on_cuda(tmp_path, synth_root):
    """extract-features and train-head on CUDA (bf16 features, what "auto" resolves to there):
    the models are written and predict on the CPU reads them."""
    from pipeline.stages.extract import run_extract
    from pipeline.stages.predict import run_predict
    from pipeline.stages.train import run_train

    cfg = make_cfg(
        tmp_path,
        synth_root,
        *TINY_TRAIN,
        f"extract.device={DEVICE}",
        f"train.device={DEVICE}",
        "extract.precision=bf16",
    )
    quiet = dict(log=lambda s: None, progress=False)
    assert run_extract(cfg, **quiet).n_images > 0
    r = run_train(cfg, **quiet)
    assert (cfg.run_dir / "models" / "models.json").is_file() and r.seconds > 0
    res = run_predict(cfg, "test", **quiet)
    assert res.n_images > 0


@needs_cuda
def test_predict_on_cuda_matches_cpu(trained, tmp_path):
    """Stage 3 on CUDA against stage 3 on CPU (same features and models)."""
    from pipeline.stages.predict import run_predict

    base, root, cfg = copy_run(trained, tmp_path / "run")
    quiet = dict(log=lambda s: None, progress=False)
    pred = cfg.run_dir / "predictions" / "test"
    cpu = masks_in(pred)
    gpu_cfg = make_cfg(base, root, *TINY_TRAIN, f"predict.device={DEVICE}")
    run_predict(gpu_cfg, "test", force=True, **quiet)
    assert agreement(masks_in(pred), cpu) >= PIXELS_MIN


@needs_cuda
def test_segment_on_cuda_matches_cpu(trained, tmp_path):
    """segment with the backbone and the heads on CUDA (float32: the run was trained on CPU
    features) against segment on the CPU."""
    from pipeline.commands.segment import run_segment

    base, root, cfg = copy_run(trained, tmp_path / "run")
    src = tmp_path / "in"
    synth_images(src, [f"img{k}.jpg" for k in range(5)], root)
    run_segment(cfg, [src], tmp_path / "cpu", overlays=False, progress=False)
    gpu_cfg = make_cfg(
        base,
        root,
        *TINY_TRAIN,
        f"extract.device={DEVICE}",
        f"predict.device={DEVICE}",
        "extract.precision=fp32",
    )
    r = run_segment(gpu_cfg, [src], tmp_path / "gpu", progress=False)
    assert r.n_written == 5 and not r.errors
    assert agreement(masks_in(tmp_path / "gpu"), masks_in(tmp_path / "cpu")) >= PIXELS_MIN


@needs_cuda
def test_export_then_run_on_cuda(trained, tmp_path):
    """The exported file, loaded and moved to CUDA with move_to_device_pass (as
    docs/segment-export.md says), gives the CPU program's probabilities."""
    import torch.export.passes

    from pipeline.commands.export import run_export

    _, _, cfg = copy_run(trained, tmp_path / "run")
    path = tmp_path / "model.pt2"
    run_export(cfg, path, height=32, width=48)
    cpu = torch.export.load(path).module()
    gpu = torch.export.passes.move_to_device_pass(torch.export.load(path), DEVICE).module()
    x = torch.randint(
        0, 256, (3, 3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want, got = cpu(x), gpu(x.to(DEVICE))
    assert got.device.type == DEVICE and got.shape == want.shape == (3, 1, 96, 128)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-2)
    assert float(((got.cpu() > 0.5) == (want > 0.5)).float().mean()) >= PIXELS_MIN
