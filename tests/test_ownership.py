"""Nothing of the user's is written over or deleted: the tool writes only inside folders it
created (a marker) and over files it wrote (a write-ahead ledger of their contents), and
`segment` refuses an output path that is one of its inputs, all before any work."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from pipeline.commands.segment import run_segment
from pipeline.core.errors import OwnershipError
from pipeline.core.owned import MARKER, Ledger, claim_folder
from pipeline.stages.extract import run_extract
from pipeline.stages.train import run_train
from tests.conftest import (
    cli_sets,
    make_cfg,
    one_line_error,
    run_cli,
    synth_images,
)

QUIET = dict(log=lambda s: None, progress=False)


def tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (what must stay unchanged)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------- segment


def test_segment_refuses_to_write_a_mask_over_its_input(trained, tmp_path):
    """`segment PHOTO.png --out <PHOTO's folder>`: exit 2 before any work, the photo intact,
    even in an empty folder of the tool's own and with --force."""
    base, root, cfg = trained
    photos = tmp_path / "photos"
    synth_images(photos, ["PHOTO.png", "other.jpg"], root)
    before = tree(photos)
    for extra in ([], ["--force"]):
        r = run_cli(
            "segment",
            str(photos / "PHOTO.png"),
            "--out",
            str(photos),
            *extra,
            *cli_sets(base, root),
        )
        assert r.returncode == 2, r.stderr
        one_line_error(r, str(photos / "PHOTO.png"))
        assert tree(photos) == before
    # a marked folder holding an input at the overlay path of another input
    out = tmp_path / "out"
    claim_folder(out, "test")
    synth_images(out, ["overlays/sub/a.jpg"], root)
    synth_images(tmp_path / "in", ["sub/a.jpg"], root)
    before = tree(out)
    with pytest.raises(OwnershipError, match="is one of the images"):
        run_segment(cfg, [tmp_path / "in", out / "overlays" / "sub" / "a.jpg"], out, progress=False)
    assert tree(out) == before


def test_segment_refuses_a_folder_it_did_not_create(trained, tmp_path):
    """An existing, non-empty folder without the marker is refused (exit 2), nothing written;
    an empty one is taken and marked."""
    base, root, cfg = trained
    synth_images(tmp_path / "in", ["a.jpg"], root)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.png").write_bytes(b"my own file")
    (docs / "notes.txt").write_text("mine")
    before = tree(docs)
    r = run_cli(
        "segment", str(tmp_path / "in"), "--out", str(docs), "--force", *cli_sets(base, root)
    )
    assert r.returncode == 2, r.stderr
    one_line_error(r, str(docs), "not created by")
    assert tree(docs) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_segment(cfg, [tmp_path / "in"], empty, progress=False).n_written == 1
    assert (empty / MARKER).is_file() and (empty / "a.png").is_file()


def test_segment_never_overwrites_or_deletes_a_file_it_did_not_write(trained, tmp_path):
    base, root, cfg = trained
    src, out = tmp_path / "in", tmp_path / "out"
    synth_images(src, ["a.jpg", "b.jpg", "c.jpg"], root)
    assert run_segment(cfg, [src], out, progress=False).n_written == 3
    # the user's own files put at the tool's paths
    (out / "overlays" / "a.jpg").write_bytes(b"my overlay")
    (out / "b.png").write_bytes(b"my mask")
    # --no-overlays removes only the overlays the tool wrote
    synth_images(src, ["a.jpg", "c.jpg"], root, first=3)  # new content: both recomputed
    res = run_segment(cfg, [src / "a.jpg", src / "c.jpg"], out, overlays=False, progress=False)
    assert res.n_written == 2
    assert (out / "overlays" / "a.jpg").read_bytes() == b"my overlay"
    assert not (out / "overlays" / "c.jpg").exists()
    # a changed input whose mask path holds the user's file: refused, --force included
    synth_images(src, ["b.jpg"], root, first=4)
    for force in (False, True):
        with pytest.raises(OwnershipError, match="b.png: exists and was not written"):
            run_segment(cfg, [src / "b.jpg"], out, force=force, progress=False)
        assert (out / "b.png").read_bytes() == b"my mask"
    # an input that became unreadable: its outputs go only when they are the tool's
    (src / "b.jpg").write_bytes(b"broken")
    (src / "c.jpg").write_bytes(b"broken")
    res = run_segment(cfg, [src / "b.jpg", src / "c.jpg"], out, progress=False)
    assert len(res.errors) == 2
    assert (out / "b.png").read_bytes() == b"my mask"
    assert not (out / "c.png").exists()


def test_a_garbled_ledger_means_not_ours(trained, tmp_path):
    """With the marker garbled, the tool's own masks are recomputed to the same bytes
    (allowed: byte-equal), and a mask the user changed is refused, not overwritten."""
    base, root, cfg = trained
    src, out = tmp_path / "in", tmp_path / "out"
    synth_images(src, ["a.jpg", "b.jpg"], root)
    run_segment(cfg, [src], out, progress=False)
    masks = tree(out)
    (out / MARKER).write_text("{garbled")
    res = run_segment(cfg, [src], out, progress=False)
    assert res.n_written == 2 and {k: v for k, v in tree(out).items() if k.endswith(".png")} == {
        k: v for k, v in masks.items() if k.endswith(".png")
    }
    (out / MARKER).write_text("{garbled")
    (out / "a.png").write_bytes(b"edited by hand")
    with pytest.raises(OwnershipError, match="a.png"):
        run_segment(cfg, [src], out, progress=False)
    assert (out / "a.png").read_bytes() == b"edited by hand"


# ----------------------------------------------------------------------------- stages and export


def test_stages_refuse_run_and_cache_folders_they_did_not_create(synth_root, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = tree(mine)
    cfg = make_cfg(
        tmp_path, synth_root, f"paths.outputs={tmp_path}", "run.name=mine", "data.val_split="
    )
    run_extract(cfg, ["train"], **QUIET)  # stage 1 writes into the cache only
    assert tree(mine) == before
    with pytest.raises(OwnershipError, match="not created by"):
        run_train(cfg, **QUIET)
    cfg = make_cfg(tmp_path, synth_root, f"paths.cache={mine}")
    r = run_cli(
        "extract-features",
        "--split",
        "test",
        *[
            a
            for s in (
                f"data.root={synth_root}",
                f"paths.cache={mine}",
                f"paths.outputs={tmp_path / 'o'}",
                "backbone.name=mobilenet_v2",
                "backbone.weights=random",
                "extract.device=cpu",
            )
            for a in ("--set", s)
        ],
    )
    assert r.returncode == 2
    one_line_error(r, str(mine), "paths.cache")
    assert tree(mine) == before
    # a run folder of an earlier version (stages/, no marker) is the tool's
    cfg = make_cfg(tmp_path, synth_root, "train.epochs=1", "train.linear_epochs=1")
    (cfg.run_dir / "stages").mkdir(parents=True)
    run_extract(cfg, ["train"], **QUIET)
    run_train(cfg, **QUIET)
    assert (cfg.run_dir / MARKER).is_file()


def test_ledger_write_ahead_and_byte_equal():
    """Unit: a killed write leaves either the old or the new content, both known as ours;
    a foreign file is refused unless byte-equal."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        folder = claim_folder(Path(d) / "f", "test")
        led = Ledger(folder, "test")
        led.write(folder / "x.bin", b"one")
        led.intend({folder / "x.bin": b"two"})  # recorded, then "killed" before the write
        again = Ledger(folder, "test")
        assert again.content_is(folder / "x.bin")  # the old content is still ours
        again.write(folder / "x.bin", b"two")
        (folder / "y.bin").write_bytes(b"foreign")
        again.check(folder / "y.bin", b"foreign")  # byte-equal: allowed
        with pytest.raises(OwnershipError):
            again.check(folder / "y.bin", b"other")
        assert not again.remove(folder / "y.bin") and (folder / "y.bin").exists()
        assert json.loads((folder / MARKER).read_text())["tool"] == "vit-objseg"


def test_export_never_replaces_a_file_it_did_not_write(trained_copy, tmp_path, monkeypatch):
    """`export --out FILE` over a user's file: exit 2 before any work, the file intact
    (--force included); a file the tool exported is replaced. (A copy of the run: export
    records what it wrote in the run folder. Whose file it is does not depend on the program
    inside: the tool's own exports are of a tiny stand-in program, not a traced backbone,
    which test_export covers.)"""
    import torch

    from pipeline.commands import export as export_mod
    from pipeline.commands.export import run_export

    base, root, cfg = trained_copy
    mine = tmp_path / "model.pt2"
    mine.write_bytes(b"my own model")
    for force in (False, True):
        with pytest.raises(OwnershipError, match="model.pt2: exists and was not written"):
            run_export(cfg, mine, force=force)
    assert mine.read_bytes() == b"my own model"
    r = run_cli("export", "--out", str(mine), *cli_sets(base, root))
    assert r.returncode == 2
    one_line_error(r, str(mine), "move or delete")
    stand_in = torch.export.export(torch.nn.Identity(), (torch.zeros(1),))
    monkeypatch.setattr(export_mod, "export_program", lambda program, patch, h, w: stand_in)
    ours = tmp_path / "exported" / "m.pt2"
    first = run_export(cfg, ours)
    assert not first.up_to_date and ours.is_file()
    assert not run_export(cfg, ours, force=True).up_to_date  # ours: replaced


def test_demo_does_not_write_its_dataset_into_a_folder_of_yours(tmp_path):
    mine = tmp_path / "pictures"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"not generated")
    before = tree(mine)
    r = run_cli(
        "demo",
        "--set",
        f"data.root={mine}",
        "--set",
        f"paths.cache={tmp_path / 'c'}",
        "--set",
        f"paths.outputs={tmp_path / 'o'}",
    )
    assert r.returncode == 2, r.stderr
    one_line_error(r, str(mine), "data.root")
    assert tree(mine) == before


def test_relative_out_paths_are_checked_where_they_are(trained_copy, tmp_path):
    """`--out` and `export --out` relative to the working folder: the ledger checks the file
    that is really there (the run folder's own marker, a dataset image, predict's masks).
    On a copy of the run: the commands aim at the run folder itself."""
    base, root, cfg = trained_copy
    run_rel = os.path.relpath(cfg.run_dir, tmp_path)
    marker = cfg.run_dir / MARKER
    before = marker.read_bytes()
    img = sorted((root / "test").rglob("images/*.jpg"))[0]
    image_before = img.read_bytes()
    for target in (f"{run_rel}/{MARKER}", os.path.relpath(img, tmp_path)):
        r = run_cli("export", "--out", target, *cli_sets(base, root), cwd=tmp_path)
        assert r.returncode == 2, (target, r.stdout, r.stderr)
    assert marker.read_bytes() == before and img.read_bytes() == image_before
    # segment into the run folder (marked): predict's mask of another image is not overwritten
    pred = sorted((cfg.run_dir / "predictions" / "test").rglob("*.png"))[0]
    mine = tmp_path / "u" / "predictions" / "test" / pred.parent.name / f"{pred.stem}.jpg"
    synth_images(mine.parent, [mine.name], root, first=3)
    pred_before = pred.read_bytes()
    r = run_cli("segment", "u", "--out", run_rel, *cli_sets(base, root), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    one_line_error(r, "was not written here by")
    assert pred.read_bytes() == pred_before


# ----------------------------------------------------------------------------- red-team cases


def test_split_names_must_be_plain_folder_names(synth_root, tmp_path):
    """An absolute split name or one with `..` would make stage 1 and predict write into the
    dataset (the join drops the prefix): refused up front, exit 2, the dataset intact."""
    before = tree(synth_root)
    sets = cli_sets(tmp_path, synth_root)
    for split in (str(synth_root / "test"), "test/../train", "..", ".hidden"):
        for cmd in (
            ["extract-features", "--split", split],
            ["predict", "--split", split],
            ["status", "--split", split],
        ):
            r = run_cli(*cmd, *sets)
            assert r.returncode == 2, (cmd, r.stderr)
            one_line_error(r, "--split")
        r = run_cli("extract-features", *cli_sets(tmp_path, synth_root, f"data.test_split={split}"))
        assert r.returncode == 2
        one_line_error(r, "data.test_split")
    assert tree(synth_root) == before and not (tmp_path / "cache").exists()


def test_a_link_inside_the_tools_folders_is_refused(trained_copy, synth_root, tmp_path):
    """A folder of the run replaced by a link to a folder of the user's: predict refuses
    (exit 2) instead of writing masks through it; the user's files are intact."""
    run_base, _, cfg = trained_copy
    mine = tmp_path / "mine"
    synth_images(mine / "test" / "disc", ["00000.png"], synth_root)
    before = tree(mine)
    preds = cfg.run_dir / "predictions"
    preds.rename(tmp_path / "predictions.orig")
    preds.symlink_to(mine, target_is_directory=True)
    r = run_cli("predict", "--force", *cli_sets(run_base, synth_root))
    assert r.returncode == 2, r.stderr
    one_line_error(r, str(preds), "symbolic link")
    assert tree(mine) == before


def test_segment_does_not_read_the_tools_own_folders_as_input(trained, tmp_path):
    """`segment ph --out ph/masks1`, then `--out ph/masks2`: the first run's masks and
    overlays are not segmented again."""
    base, root, cfg = trained
    ph = tmp_path / "ph"
    synth_images(ph, ["a.jpg", "b.jpg"], root)
    assert run_segment(cfg, [ph], ph / "masks1", progress=False).n_written == 2
    res = run_segment(cfg, [ph], ph / "masks2", progress=False)
    assert res.n_written == 2 and not (ph / "masks2" / "masks1").exists()
