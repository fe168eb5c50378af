"""Dataset layouts, decoding of any image/mask mode, the contract's mask rule, and the canvas."""
import numpy as np
import pytest
from PIL import Image

from pipeline.fsutil import FileHasher
from pipeline.data import (Box, DataError, canvas_valid, fit_box, from_canvas,
                           list_items, list_splits, load_image, load_item, load_mask, to_canvas)
from pipeline.synth import make_dataset


def test_obj_seg_layout(synth_root):
    assert list_splits(synth_root, "obj_seg") == ["test", "train"]
    items, problems = list_items(synth_root, "obj_seg", "train")
    assert problems == [] and len(items) == 12
    assert [it.key for it in items[:2]] == ["block/00000", "block/00001"]
    assert items[0].image == "train/block/images/00000.jpg"
    assert items[0].mask == "train/block/annotations/00000.png"


def test_davis_layout(synth_davis_root):
    assert list_splits(synth_davis_root, "davis2016") == ["train", "val"]
    items, problems = list_items(synth_davis_root, "davis2016", "val")
    assert problems == [] and len(items) == 4
    assert {it.category for it in items} == {"block-val", "disc-val"}
    assert items[0].image.startswith("JPEGImages/480p/")
    assert items[0].mask.startswith("Annotations/480p/")


def test_missing_and_empty_datasets_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        list_items(tmp_path / "nope", "obj_seg", "train")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="split 'train' of .* has no images"):
        list_items(tmp_path / "empty", "obj_seg", "train")
    with pytest.raises(DataError, match="split 'test' not found"):
        list_items(tmp_path / "empty", "obj_seg", "test")
    with pytest.raises(DataError, match="no splits found"):
        list_splits(tmp_path / "empty" / "train", "davis2016")


def test_image_without_mask_is_an_unannotated_item(tmp_path):
    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 2}, size=(32, 32))
    (root / "train" / "disc" / "annotations" / "00001.png").unlink()
    items, problems = list_items(root, "obj_seg", "train")
    assert len(items) == 4 and problems == []
    assert [(it.category, it.stem) for it in items if it.mask is None] == [("disc", "00001")]
    loaded = load_item(root, next(it for it in items if it.mask is None))
    assert loaded.mask is None and loaded.image.shape == (32, 32, 3)
    assert loaded.encoded == (root / "train/disc/images/00001.jpg").read_bytes()


def test_davis_unannotated_frames_are_items(tmp_path):
    root = make_dataset(tmp_path / "d", "davis2016", {"val": 2}, size=(32, 32))
    lst = root / "ImageSets/480p/val.txt"
    lines = lst.read_text().splitlines()
    lines[0] = lines[0].split()[0]  # a line without a mask path
    lst.write_text("\n".join(lines) + "\n")
    (root / lines[1].split()[1].lstrip("/")).unlink()  # a listed mask that is missing
    items, problems = list_items(root, "davis2016", "val")
    assert len(items) == len(lines) and problems == []
    assert sum(it.mask is None for it in items) == 2


def test_duplicate_stems_are_a_one_line_error(tmp_path):
    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 1}, size=(32, 32))
    img = root / "train/disc/images/00000.jpg"
    Image.open(img).save(img.with_suffix(".png"))
    with pytest.raises(DataError) as e:
        list_items(root, "obj_seg", "train")
    msg = str(e.value)
    assert "00000.jpg" in msg and "00000.png" in msg and "\n" not in msg


def test_broken_links_are_reported_not_raised(tmp_path):
    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 1}, size=(32, 32))
    images = root / "train/disc/images"
    (images / "dangling.jpg").symlink_to(images / "nowhere.jpg")
    (images / "loop.jpg").symlink_to(images / "loop.jpg")
    items, problems = list_items(root, "obj_seg", "train")
    assert len(items) == 2
    assert sorted(p.split(":")[0].rsplit("/", 1)[1] for p in problems) == ["dangling.jpg", "loop.jpg"]


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored landscape with EXIF 'rotate 90' decodes as the viewer shows it."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # a white band on the left of the stored pixels
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    path = tmp_path / "phone.jpg"
    im.save(path, exif=exif, quality=95)
    got = load_image(path)
    assert got.shape == (40, 20, 3)  # portrait, as displayed
    assert got[:10, :, 0].mean() > 200 and got[-10:, :, 0].mean() < 50  # the band is now on top


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK"])
def test_images_of_any_mode_decode_to_rgb(tmp_path, mode):
    arr = np.random.default_rng(0).integers(0, 255, (7, 9, 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    path = tmp_path / ("x.png" if mode != "CMYK" else "x.jpg")
    im.save(path)
    out = load_image(path)
    assert out.shape == (7, 9, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB"])
def test_mask_rule_threshold_128_after_conversion_to_L(tmp_path, mode):
    values = np.array([[0, 127, 128, 255]], np.uint8)
    base = Image.fromarray(values, "L")
    path = tmp_path / f"m_{mode}.png"
    base.convert(mode).save(path)
    assert load_mask(path).tolist() == [[False, False, True, True]]


def test_corrupt_image_and_wrong_size_mask_name_the_file(tmp_path):
    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 1}, size=(32, 48))
    items, _ = list_items(root, "obj_seg", "train")
    (root / items[0].image).write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError) as e:
        load_item(root, items[0])
    assert items[0].image in str(e.value) and "corrupt" in str(e.value)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / items[1].mask)
    with pytest.raises(DataError) as e:
        load_item(root, items[1])
    msg = str(e.value)
    assert items[1].mask in msg and "10x10" in msg and "48x32" in msg and "\n" not in msg


@pytest.mark.parametrize("h, w, fit, expected", [
    (480, 854, "crop", Box(0, 3, 480, 848)),
    (480, 854, "pad", Box(0, -5, 480, 864)),
    (30, 40, "crop", Box(7, 4, 16, 32)),
    (10, 40, "crop", Box(-3, 4, 16, 32)),  # a side shorter than a patch is padded
    (32, 32, "crop", Box(0, 0, 32, 32)),
])
def test_fit_box(h, w, fit, expected):
    assert fit_box(h, w, 16, fit) == expected


@pytest.mark.parametrize("h, w, fit", [(37, 53, "crop"), (37, 53, "pad"), (16, 16, "crop"), (9, 70, "crop")])
def test_canvas_roundtrip(h, w, fit):
    img = np.arange(h * w).reshape(h, w)
    box = fit_box(h, w, 16, fit)
    canvas = to_canvas(img, box)
    assert canvas.shape == (box.height, box.width)
    back = from_canvas(canvas, box, (h, w))
    assert back.shape == (h, w)
    valid = canvas_valid(box, (h, w))
    # every original pixel that the canvas covers comes back unchanged
    ys, xs = np.nonzero(valid)
    assert np.array_equal(canvas[valid], img[ys + box.top, xs + box.left])
    covered = np.zeros((h, w), bool)
    covered[ys + box.top, xs + box.left] = True
    assert np.array_equal(back[covered], img[covered])
    if fit == "pad":
        assert covered.all() and np.array_equal(back, img)


def test_from_canvas_accepts_torch_tensors():
    import torch
    box = fit_box(20, 35, 16, "crop")
    t = torch.arange(box.height * box.width, dtype=torch.float32).reshape(1, box.height, box.width)
    out = from_canvas(t, box, (20, 35))
    assert out.shape == (1, 20, 35)
    assert np.array_equal(out.numpy(), from_canvas(t.numpy(), box, (20, 35)))


def test_file_hasher_memo(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"hello")
    h = FileHasher(tmp_path / "memo.json")
    d1 = h.digest(f)
    h.save()
    h2 = FileHasher(tmp_path / "memo.json")
    assert h2.digest(f) == d1 and not h2._dirty  # served from the memo
    f.write_bytes(b"hello world")
    assert h2.digest(f) != d1
