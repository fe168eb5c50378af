"""Stage 2: patch targets, training from the cache, resumption after SIGKILL with identical
weights, incremental reruns and the missing-upstream error."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pipeline.core.config import copy_config
from pipeline.core.errors import PipelineError, StoreError
from pipeline.core.layout import RunLayout
from pipeline.core.registry import IMAGENET_MEAN, IMAGENET_STD
from pipeline.models.heads import (
    LEGACY_FILES,
    LinearHead,
    PacUpsampler,
    UpsamplerSpec,
    load_models,
    normalize_image,
    save_models,
)
from pipeline.stages.extract import run_extract
from pipeline.stages.extract import status as extract_status
from pipeline.stages.train import run_train, status
from pipeline.stages.train_data import patch_targets
from tests.conftest import ROOT, make_cfg

quiet = dict(log=lambda s: None, progress=False)
FAST = ("train.epochs=2", "train.linear_epochs=3", "train.crop=64", "train.batch_size=3")


def test_patch_targets_are_object_fractions_of_in_image_pixels():
    mask = np.zeros((32, 32), bool)
    mask[:16, :8] = True  # half of the top-left patch
    mask[16:, 16:] = True  # all of the bottom-right patch
    valid = np.ones((32, 32), bool)
    valid[:, 28:] = False  # the right 4 columns are padding
    mask[:, 28:] = True  # ... and whatever the mask says there is ignored
    target, weight = patch_targets(mask, valid, 16)
    np.testing.assert_allclose(target, [[0.5, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(weight, [[1.0, 0.75], [1.0, 0.75]])


@pytest.mark.parametrize("patch, n_stages", [(16, 4), (14, 3), (8, 3)])
def test_upsampler_outputs_full_size_for_any_patch_size(patch, n_stages):
    spec = UpsamplerSpec(in_channels=5, patch_size=patch)
    up = PacUpsampler(spec)
    assert len(up.stages) == n_stages
    feats = torch.randn(2, 5, 3, 4)
    image = torch.randint(0, 255, (2, 3, 3 * patch, 4 * patch), dtype=torch.uint8)
    assert up(feats, image).shape == (2, 1, 3 * patch, 4 * patch)


def test_residual_and_learned_guide_variants_run():
    spec = UpsamplerSpec(
        in_channels=5, patch_size=16, guide="learned", residual=True, normalize=True
    )
    up = PacUpsampler(spec)
    out = up(
        torch.randn(1, 5, 2, 3),
        torch.zeros(1, 3, 32, 48, dtype=torch.uint8),
        torch.randn(1, 1, 2, 3),
    )
    assert out.shape == (1, 1, 32, 48)


def test_uint8_guide_pyramid_is_the_float_pyramid_rounded_to_8_bits():
    """New models resize the 8-bit image (torch's SIMD uint8 path) and normalise it; the
    guides equal the float pyramid's up to that rounding, and every value is a normalised
    8-bit level."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (2, 3, 64, 96), generator=g, dtype=torch.uint8)
    sizes = [(8, 12), (16, 24), (32, 48), (64, 96)]
    fast = PacUpsampler(UpsamplerSpec(in_channels=5, patch_size=16))
    legacy = PacUpsampler(UpsamplerSpec(in_channels=5, patch_size=16, pyramid="float"))
    assert fast.spec.pyramid == "uint8"
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for a, b in zip(
        fast.guide_pyramid(image, sizes), legacy.guide_pyramid(image, sizes), strict=True
    ):
        levels = (a * std + mean) * 255
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)
        assert (a - b).abs().max() <= 1.0 / 255 / min(IMAGENET_STD) + 1e-6
    # full size: no resize, both are the normalised image itself
    torch.testing.assert_close(fast.guide_pyramid(image, [(64, 96)])[0], normalize_image(image))
    # a real difference at the coarse levels (the test can tell the two apart)
    assert not torch.equal(
        fast.guide_pyramid(image, sizes[:1])[0], legacy.guide_pyramid(image, sizes[:1])[0]
    )


def test_models_saved_before_the_uint8_pyramid_load_with_the_float_pyramid(tmp_path):
    """A card without the `pyramid` key (written before it existed) keeps its models' own
    computation; a card written now says uint8."""
    spec = UpsamplerSpec(in_channels=5, patch_size=16, residual=True)
    save_models(tmp_path, LinearHead(5), PacUpsampler(spec), {}, {}, 16)
    assert load_models(tmp_path).upsampler.spec.pyramid == "uint8"
    card = json.loads((tmp_path / "models.json").read_text())
    del card["upsampler"]["pyramid"]
    (tmp_path / "models.json").write_text(json.dumps(card))
    assert load_models(tmp_path).upsampler.spec.pyramid == "float"


def _legacy_card(mdir, head, up, version: int | None) -> str:
    """The model folder as card versions 1 and 2 wrote it: {"state_dict": ...} files by
    torch.save (linear_head.pt, pac_upsampler.pt); `version` None: no card_version key."""
    import hashlib
    import io

    from pipeline.core.fingerprints import fingerprint

    files = {}
    for name, module in zip(LEGACY_FILES, (head, up), strict=True):
        buf = io.BytesIO()
        torch.save({"state_dict": module.state_dict()}, buf)
        files[name] = buf.getvalue()
        (mdir / name).write_bytes(files[name])
    listing = {
        n: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()
    }
    card = {
        "fingerprint": fingerprint(listing),
        "files": listing,
        "params": {},
        "deps": {},
        "head": {"in_channels": head.conv.in_channels, "patch_size": 16},
        "upsampler": up.spec.to_dict(),
    }
    if version is not None:
        card["card_version"] = version
    (mdir / "models.json").write_text(json.dumps(card))
    return card["fingerprint"]


def test_model_files_are_safetensors_and_earlier_cards_load(tmp_path):
    """Models are written as safetensors (card_version 3, no pickle); the torch.save files
    of cards 1 (no card_version) and 2 load to the same weights and the same masks; a card
    of a newer version is refused in one line naming the file; training again replaces the
    earlier files."""
    from pipeline.core.errors import ModelError
    from pipeline.models.heads import CARD_VERSION, HEAD_FILE, UPSAMPLER_FILE

    assert CARD_VERSION == 3
    torch.manual_seed(0)
    spec = UpsamplerSpec(in_channels=5, patch_size=16)
    head, up = LinearHead(5), PacUpsampler(spec)
    for p in [*head.parameters(), *up.parameters()]:
        p.data.normal_()
    feats = torch.randn(1, 5, 2, 3)
    image = torch.randint(0, 256, (1, 3, 32, 48), dtype=torch.uint8)

    def output(models):
        with torch.no_grad():
            return models.upsampler(feats, image, models.head(feats))

    new = tmp_path / "new"
    new.mkdir()
    fp = save_models(new, head, up, {}, {}, 16)
    assert sorted(p.name for p in new.iterdir()) == sorted(
        [HEAD_FILE, UPSAMPLER_FILE, "models.json"]
    )
    assert (new / HEAD_FILE).read_bytes()[8:9] == b"{"  # a safetensors header, not a zip
    card = json.loads((new / "models.json").read_text())
    assert card["card_version"] == CARD_VERSION and load_models(new).fingerprint == fp
    want = output(load_models(new))
    for version in (None, 1, 2):
        old = tmp_path / f"v{version}"
        old.mkdir()
        old_fp = _legacy_card(old, head, up, version)
        models = load_models(old)
        assert models.fingerprint == old_fp
        assert torch.equal(output(models), want)
    card["card_version"] = CARD_VERSION + 1
    (new / "models.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="newer than this vit-objseg reads"):
        load_models(new)
    assert save_models(tmp_path / "v2", head, up, {}, {}, 16) == fp  # trained again
    assert sorted(p.name for p in (tmp_path / "v2").iterdir()) == sorted(
        [HEAD_FILE, UPSAMPLER_FILE, "models.json"]
    )


def test_missing_cache_names_the_command(tmp_path, synth_root):
    cfg = make_cfg(tmp_path, synth_root, *FAST)
    with pytest.raises(StoreError, match="extract-features --split train"):
        run_train(cfg, **quiet)


def test_train_end_to_end_and_incremental(tmp_path, synth_root):
    cfg = make_cfg(tmp_path, synth_root, *FAST, "data.val_split=test")
    run_extract(cfg, **quiet)
    assert status(cfg).state == "missing"
    res = run_train(cfg, **quiet)
    assert not res.up_to_date
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in rows] == [
        ("linear", 1),
        ("linear", 2),
        ("linear", 3),
        ("upsampler", 1),
        ("upsampler", 2),
    ]
    assert rows[2]["loss"] < rows[0]["loss"]  # the linear head learns
    assert all(0 <= r["val_miou"] <= 1 for r in rows if r["phase"] == "upsampler")
    assert (cfg.run_dir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    models = load_models(RunLayout.of(cfg).models)
    assert models.patch_size == 16
    assert not (cfg.run_dir / "models" / "checkpoint.pt").exists()
    # unchanged -> up to date; a training key -> stale, stage 1 untouched
    assert status(cfg).state == "up-to-date" and run_train(cfg, **quiet).up_to_date
    cfg_lr = copy_config(cfg, **{"train.lr": 1e-3})
    st = status(cfg_lr)
    assert st.state == "stale" and "train.lr: 0.002 -> 0.001" in st.why
    assert extract_status(cfg_lr).state == "up-to-date"
    # device and worker count do not change the result
    assert status(copy_config(cfg, **{"train.device": "cpu"})).state == "up-to-date"


def _weights(cfg):
    m = load_models(RunLayout.of(cfg).models)
    return {
        **{f"h.{k}": v for k, v in m.head.state_dict().items()},
        **{f"u.{k}": v for k, v in m.upsampler.state_dict().items()},
    }


def test_sigkill_then_resume_gives_the_same_weights(tmp_path, synth_root):
    sets = ("train.epochs=4", "train.linear_epochs=2", "train.crop=64", "train.batch_size=2")
    clean = make_cfg(tmp_path / "clean", synth_root, *sets)
    run_extract(clean, **quiet)
    run_train(clean, **quiet)
    expected = _weights(clean)

    killed = make_cfg(tmp_path / "killed", synth_root, *sets)
    run_extract(killed, **quiet)
    args = [sys.executable, str(ROOT / "cli.py"), "train-head"]
    for s in [
        f"data.root={synth_root}",
        f"paths.cache={tmp_path / 'killed' / 'cache'}",
        f"paths.outputs={tmp_path / 'killed' / 'outputs'}",
        "backbone.name=mobilenet_v2",
        "backbone.weights=random",
        "train.device=cpu",
        *sets,
    ]:
        args += ["--set", s]
    metrics = killed.run_dir / "metrics.jsonl"
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_end = time.time() + 120
    # kill once the first PAC epoch is checkpointed (linear phase done, upsampler mid-way)
    while time.time() < t_end and p.poll() is None:
        if metrics.is_file() and '"upsampler"' in metrics.read_text():
            break
        time.sleep(0.01)
    assert p.poll() is None, "training finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert (killed.run_dir / "models" / "checkpoint.pt").is_file()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    got = _weights(killed)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_weights_do_not_depend_on_the_thread_count(tmp_path):
    """Each image's forward and backward run alone in one thread, gradients are summed in
    image order: 1, 2 or 3 threads give the same weights, bit for bit."""
    from pipeline.data.synth import make_dataset

    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 3}, size=(224, 288), seed=3)
    threads = torch.get_num_threads()
    weights = []
    try:
        for n in (1, 2, 3):
            cfg = make_cfg(
                tmp_path / f"t{n}",
                root,
                "train.epochs=2",
                "train.linear_epochs=2",
                "train.crop=160",
                "data.test_split=train",
            )
            torch.set_num_threads(2)
            run_extract(cfg, **quiet)
            torch.set_num_threads(n)
            run_train(cfg, **quiet)
            weights.append(_weights(cfg))
    finally:
        torch.set_num_threads(threads)
    for w in weights[1:]:
        assert w.keys() == weights[0].keys()
        assert all(torch.equal(w[k], weights[0][k]) for k in w)


def _strict_json_lines(path) -> list[dict]:
    """The rows of a JSON-lines file, refusing NaN / Infinity (not JSON)."""

    def refuse(constant):
        raise ValueError(f"{constant} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "phase, key, kept_next, kept_rows",
    [
        # the PAC loss turns NaN in PAC epoch 2: the checkpoint after PAC epoch 1 is kept
        (
            2,
            "train.lr",
            {"linear": 3, "upsampler": 2},
            [("linear", 1), ("linear", 2), ("upsampler", 1)],
        ),
        # the linear loss turns NaN in linear epoch 2: the checkpoint after linear epoch 1 is kept
        (1, "train.linear_lr", {"linear": 2, "upsampler": 1}, [("linear", 1)]),
    ],
)
def test_a_diverging_loss_stops_training_keeping_the_last_good_checkpoint(
    tmp_path, synth_root, monkeypatch, capsys, phase, key, kept_next, kept_rows
):
    import cli
    import pipeline.stages.train_compute as train_mod
    from pipeline.models.heads import CARD_FILE

    cfg = make_cfg(
        tmp_path,
        synth_root,
        "train.epochs=3",
        "train.linear_epochs=2",
        "train.crop=48",
        "train.batch_size=3",
    )
    run_extract(cfg, **quiet)

    now = {}  # the (phase, epoch) being trained: every epoch draws its rng from it
    epoch_rng = train_mod.epoch_rng

    def spy(seed, ph, epoch):
        now["at"] = (ph, epoch)
        return epoch_rng(seed, ph, epoch)

    def poisoned(forward, when):
        def wrapped(self, *args, **kwargs):
            out = forward(self, *args, **kwargs)
            return out * float("nan") if now.get("at") == when else out

        return wrapped

    monkeypatch.setattr(train_mod, "epoch_rng", spy)
    target = PacUpsampler if phase == 2 else LinearHead
    monkeypatch.setattr(target, "forward", poisoned(target.forward, (phase, 2)))

    with pytest.raises(SystemExit) as e:  # through the CLI's error boundary
        cli.guarded(run_train, cfg, **quiet)
    assert e.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: train-head: training diverged"), err
    assert "epoch 2/" in err[0] and f"lower {key}" in err[0] and "nan" in err[0]

    with pytest.raises(PipelineError) as e:  # the error type itself, and again the same
        run_train(cfg, **quiet)
    assert type(e.value).__name__ == "TrainingDiverged" and e.value.exit_code == 1

    mdir = RunLayout.of(cfg).models
    assert not (mdir / CARD_FILE).exists()  # save_models was never reached
    assert not (cfg.run_dir / "loss_curves.png").exists()
    assert status(cfg).state == "missing"  # no stage record
    ck = torch.load(mdir / "checkpoint.pt", weights_only=True)
    assert ck["next"] == kept_next
    assert all(torch.isfinite(v).all() for v in ck["up"].values() if v.is_floating_point())
    rows = _strict_json_lines(cfg.run_dir / "metrics.jsonl")
    assert [(r["phase"], r["epoch"]) for r in rows] == kept_rows


def test_metrics_jsonl_refuses_non_finite_values(tmp_path, synth_root):
    from pipeline.stages.train_compute import write_history

    cfg = make_cfg(tmp_path, synth_root)
    with pytest.raises(ValueError):
        write_history(
            RunLayout.of(cfg).history, [{"phase": "linear", "epoch": 1, "loss": float("nan")}]
        )
    assert not (cfg.run_dir / "metrics.jsonl").exists()


def test_the_stage_module_loads_no_torch_so_status_need_not():
    """pipeline.stages.train (TrainStage, which `status` judges) imports its computation,
    and with it torch, only when it trains."""
    code = "import sys, pipeline.stages.train; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
