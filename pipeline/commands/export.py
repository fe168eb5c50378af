"""`export`: the run's whole inference path as one self-contained `torch.export` program.

    prob = torch.export.load("model.pt2").module()(images)   # torch alone, no pipeline

`images`: uint8 RGB (B, 3, H, W), H and W multiples of the backbone's patch size (dynamic:
any batch, sides from MIN_PATCHES patches to MAX_SIDE); `prob`: float32 (B, 1, H, W), the
object probability (the PAC upsampler's sigmoid); a pixel is object where prob >
`predict.threshold` (recorded in the archive's META_FILE, with the patch size and sides).
Images of other sizes are cropped or padded to a multiple of the patch first, as `segment`
does (`extract.fit`).

The program holds the backbone with its weights and input normalisation, the features
rounded to `extract.feature_dtype` (what the heads were trained on: the store keeps them so),
the linear head and the PAC upsampler. It computes what `segment` computes, but not bit for
bit: the backbone runs batched with torch's default threading instead of one single-threaded
pass per image, and a ViT's position embeddings are resized by interpolation matrices
(`positions._exportable_pos_embed`, within float32 rounding of torch's bicubic kernel)
because torch.export would freeze F.interpolate's scale factor to the example's size. The
float16 rounding of the features turns such tiny differences into occasional one-step
differences of a feature, so a few pixels near the threshold may flip: tests require
>= 99.9 % equal pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..core.config import Config
from ..core.errors import UsageError
from ..core.fsutil import sha256_bytes, sha256_file
from ..core.hints import command
from ..core.keys import Keys
from ..core.layout import RunLayout
from ..core.owned import Ledger
from ..core.variants import CANDIDATE
from ..inference import BackboneRunner, checked_models
from ..models.backbones import Backbone
from ..models.devices import config_keys
from ..models.heads import TrainedModels
from ..runconfig import reproduces
from ..stages.base import Recording, StageState, load_record, reproduce
from ..stages.thresholds import Calibration, resolve_thresholds

STAGE = "export"
MAX_SIDE = 8192  # largest image side the program accepts
# Smallest image side the program accepts, in patches. torch.export (2.14) specialises a size
# of 1 ("0/1 specialisation"): tracing, the contiguity, channels-last and view checks of
# convolutions and reshapes branch on size != 1, so a program traced at more than one patch
# fails on one patch with an obscure guard; backed_size_oblivious tracing moves the problem
# to a batch of 1. The Dims therefore declare the minimum, and torch refuses a smaller side
# with "Guard failed: images.size()[2] >= 32" (patch 16), which the meta and
# docs/segment-export.md explain.
MIN_PATCHES = 2
MAX_BATCH = 1024
EXAMPLE_PATCHES = (14, 20)  # default example size for tracing, in patches (height, width)
# in the archive: torch.export.load(path, extra_files={META_FILE: ""})
META_FILE = "vit_objseg.json"


class SegmentationProgram(nn.Module):
    """uint8 images (B, 3, H, W), H and W multiples of the patch size -> object probability
    (B, 1, H, W): backbone (with its normalisation), features rounded to the stored dtype,
    linear head, PAC upsampler (residual on the head's logits when so trained), sigmoid.
    `mirror_tta` (predict.tta = "flip"): the logits averaged with the mirror image's."""

    def __init__(
        self,
        backbone: Backbone,
        models: TrainedModels,
        feature_dtype: torch.dtype,
        mirror_tta: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = models.head
        self.upsampler = models.upsampler
        self.feature_dtype = feature_dtype
        self.mirror_tta = mirror_tta

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(images).to(self.feature_dtype).float().permute(0, 3, 1, 2)
        return self.upsampler(feats, images, self.head(feats))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.logits(images)
        if self.mirror_tta:
            logits = (logits + self.logits(images.flip(-1)).flip(-1)) * 0.5
        return torch.sigmoid(logits)


@dataclass(frozen=True)
class ExportSettings:
    """What export reads of the config, taken from it once (`of`)."""

    keys: Keys
    weights: str  # backbone.weights as configured (a file or a name)
    batch_size: int  # extract.batch_size
    compile: bool  # extract.compile
    layout: RunLayout  # the run's folder
    threshold: float = 0.5  # the pac masks' (predict.threshold, "auto" resolved in run_export)

    @classmethod
    def of(cls, cfg: Config) -> ExportSettings:
        """`cfg`'s settings; a bad backbone.layers or weights path is told here."""
        return cls(
            config_keys(cfg),
            cfg.backbone.weights,
            cfg.extract.batch_size,
            cfg.extract.compile,
            RunLayout.of(cfg),
        )


def build_program(settings: ExportSettings, models: TrainedModels) -> SegmentationProgram:
    """The program on CPU in eval mode, without gradients; the backbone is built and
    optimised exactly as stage 1 builds it (`inference.BackboneRunner`)."""
    feature = settings.keys.feature
    backbone = BackboneRunner(
        feature,
        settings.weights,
        device=torch.device("cpu"),
        batch_size=settings.batch_size,
        compile=settings.compile,
    ).backbone
    tta = settings.keys.predict.tta == "flip"
    program = SegmentationProgram(backbone, models, getattr(torch, feature.feature_dtype), tta)
    return program.to("cpu").eval().requires_grad_(False)


def side_range(patch: int) -> tuple[int, int]:
    """The smallest and the largest image side (pixels, multiples of `patch`) the program
    accepts."""
    return MIN_PATCHES * patch, MAX_SIDE // patch * patch


def _example_side(value: int | None, default_patches: int, patch: int, name: str) -> int:
    """The example's side for --height/--width: `value`, or `default_patches` patches; a
    UsageError naming the option, the value and the allowed range when it is not one."""
    if value is None:
        return default_patches * patch
    low, high = side_range(patch)
    if value % patch or not low <= value <= high:
        raise UsageError(
            f"--{name} {value}: must be a multiple of the patch size {patch} from {low} to {high}"
        )
    return value


def export_program(
    program: SegmentationProgram, patch: int, height: int, width: int
) -> torch.export.ExportedProgram:
    """torch.export of `program` with a dynamic batch and dynamic H, W (multiples of
    `patch`, MIN_PATCHES patches to MAX_SIDE), traced on a (2, 3, height, width) example."""
    Dim = torch.export.Dim
    dims = {
        "images": {
            0: Dim("batch", min=1, max=MAX_BATCH),
            2: Dim("h", min=MIN_PATCHES, max=MAX_SIDE // patch) * patch,
            3: Dim("w", min=MIN_PATCHES, max=MAX_SIDE // patch) * patch,
        }
    }
    example = torch.randint(
        0, 256, (2, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    return torch.export.export(program, (example,), dynamic_shapes=dims)


def meta(settings: ExportSettings, models: TrainedModels, patch: int) -> dict:
    """What a user of the file needs besides torch (stored in the archive as META_FILE)."""
    low, high = side_range(patch)
    return {
        "input": (
            f"uint8 RGB (B, 3, H, W), H and W multiples of {patch} from {low} "
            f"({MIN_PATCHES} patches) to {high}; torch refuses a smaller side with "
            f"AssertionError: Guard failed: images.size()[d] >= {low} (d = 2: H, 3: W)"
        ),
        "output": "float32 (B, 1, H, W): object probability",
        "patch_size": patch,
        "min_side": low,
        "max_side": high,
        "threshold": settings.threshold,
        "fit": settings.keys.feature.fit,
        "tta": settings.keys.predict.tta,
        "backbone": settings.keys.feature.backbone,
        "weights": settings.weights,
        "models_fingerprint": models.fingerprint,
        "run": settings.layout.name,
        "torch": torch.__version__,
    }


@dataclass
class ExportResult:
    path: Path
    patch_size: int
    up_to_date: bool = False
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class Export(Recording[ExportResult]):
    """One run of `export`, as the run template (`stages.base.reproduce`) runs it: no lock
    (it only reads the models, under checked_models' shared lock)."""

    settings: ExportSettings
    models: TrainedModels
    path: Path
    height: int | None
    width: int | None
    log: Callable[[str], None]
    t0: float

    def __post_init__(self) -> None:
        self.label, self.run_dir, self.lock = STAGE, self.settings.layout.root, None

    def state(self) -> StageState:
        keys = self.settings.keys
        params = {**keys.feature.inference_params(), **keys.predict.tta_params()}
        params.update(
            {
                "predict.threshold": self.settings.threshold,
                "out": str(self.path.resolve()),
                "height": self.height,
                "width": self.width,
                "min_patches": MIN_PATCHES,
                "torch": torch.__version__,
            }
        )
        rec = load_record(self.run_dir, STAGE)
        try:
            intact = rec is not None and sha256_file(self.path) == rec.get("sha256")
        except OSError:
            intact = False
        return StageState(
            STAGE,
            {"models": self.models.fingerprint},
            params,
            "" if intact else f"{self.path} missing or changed",
            {"models": command("train-head")},
        )

    def current(self, _state: StageState) -> ExportResult:
        return ExportResult(
            self.path, self.models.patch_size, up_to_date=True, bytes=self.path.stat().st_size
        )

    def compute(
        self, state: StageState, _force: bool
    ) -> tuple[ExportResult, StageState, dict[str, Any]]:
        settings, log, path = self.settings, self.log, self.path
        # the run folder's ledger records every file export writes, wherever it is
        ledger = Ledger(self.run_dir, "export")
        ledger.check(path)  # before the work: never replace a file the tool did not write
        backbone = settings.keys.feature.backbone
        log(f"export: loading the backbone ({backbone}) and the run's heads")
        program = build_program(settings, self.models)
        patch = program.backbone.spec.patch_size
        h = _example_side(self.height, EXAMPLE_PATCHES[0], patch, "height")
        w = _example_side(self.width, EXAMPLE_PATCHES[1], patch, "width")
        log(
            f"export: tracing with torch.export on a (2, 3, {h}, {w}) example, dynamic batch "
            "and size (the long step: a minute or two for a ViT on a CPU)"
        )
        t_trace = time.perf_counter()
        exported = export_program(program, patch, h, w)
        log(
            f"export: traced in {time.perf_counter() - t_trace:.1f} s; saving the program "
            "with its weights"
        )
        buf = io.BytesIO()
        with warnings.catch_warnings():
            # the archive writer's note on channels-last weights (a CNN's, see
            # Backbone.optimize_for_inference): they are saved whole and load unchanged
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            meta_text = json.dumps(meta(settings, self.models, patch), indent=1)
            torch.export.save(exported, buf, extra_files={META_FILE: meta_text})
        data = buf.getvalue()
        ledger.write(path, data)
        res = ExportResult(path, patch, bytes=len(data), seconds=time.perf_counter() - self.t0)
        return res, state, {"sha256": sha256_bytes(data)}


def run_export(
    cfg: Config,
    out: str | Path | None = None,
    height: int | None = None,
    width: int | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Export the run's models with their backbone to `out` (default `<run>/model.pt2`);
    up-to-date (nothing done) while the models, the settings and the file are unchanged.
    ModelError naming train-head when the models are missing or do not match `cfg`. `log`:
    a line before each step (why it exports, loading, tracing, saving), as the stages do."""
    t0 = time.perf_counter()
    layout = RunLayout.of(cfg)
    path = Path(out) if out is not None else layout.export
    if path.is_dir() or not path.name:
        raise UsageError(f"--out {str(out)!r}: a folder, not a file name (e.g. model.pt2)")
    settings = ExportSettings.of(cfg)  # a bad layers or weights path is told before any models
    as_trained = functools.partial(reproduces, cfg)
    with checked_models(layout, settings.keys, cfg.paths.cache, as_trained=as_trained) as models:
        cal = Calibration.from_config(cfg)
        chosen = resolve_thresholds(layout, cal, None, models.fingerprint).values[CANDIDATE]
        settings = dataclasses.replace(settings, threshold=chosen)
        return reproduce(Export(settings, models, path, height, width, log, t0), force, log)
