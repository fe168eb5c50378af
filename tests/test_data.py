"""Dataset layouts, decoding of any image/mask mode, the contract's mask rule, and the canvas."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import DataError
from pipeline.core.fsutil import FileHasher
from pipeline.data import (
    Box,
    canvas_valid,
    fit_box,
    from_canvas,
    list_items,
    list_splits,
    load_image,
    load_item,
    load_mask,
    to_canvas,
)
from pipeline.data.synth import make_dataset


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
    names = sorted(p.split(":")[0].rsplit("/", 1)[1] for p in problems)
    assert names == ["dangling.jpg", "loop.jpg"]


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


@pytest.mark.parametrize(
    "h, w, fit, expected",
    [
        (480, 854, "crop", Box(0, 3, 480, 848)),
        (480, 854, "pad", Box(0, -5, 480, 864)),
        (30, 40, "crop", Box(7, 4, 16, 32)),
        (10, 40, "crop", Box(-3, 4, 16, 32)),  # a side shorter than a patch is padded
        (32, 32, "crop", Box(0, 0, 32, 32)),
    ],
)
def test_fit_box(h, w, fit, expected):
    assert fit_box(h, w, 16, fit) == expected


@pytest.mark.parametrize(
    "h, w, fit", [(37, 53, "crop"), (37, 53, "pad"), (16, 16, "crop"), (9, 70, "crop")]
)
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


# ----------------------------------------------------------------------------- hostile files


def _alarm(seconds: int):
    """A context that fails the test (TimeoutError) instead of hanging when the main thread
    blocks longer than `seconds` (a FIFO opened for reading blocks until a writer comes)."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def guard():
        def fail(signum, frame):
            raise TimeoutError(f"still blocked after {seconds} s")

        old = signal.signal(signal.SIGALRM, fail)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)

    return guard()


def test_huge_image_is_refused_from_its_header(tmp_path):
    """A 20000x20000 PNG (400 MP, 48 KB on disk): ImageTooLarge naming the file, its size,
    its megapixels and data.max_pixels, before decoding, without PIL's bomb warning/error."""
    import warnings

    from pipeline.core.errors import ImageTooLarge

    path = tmp_path / "big.png"
    Image.new("1", (20000, 20000)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        for load in (load_image, load_mask):
            with pytest.raises(ImageTooLarge) as e:
                load(path, 40_000_000)
            msg = str(e.value)
            assert e.value.pixels == 400_000_000 and "\n" not in msg
            for part in (str(path), "20000x20000", "400 megapixels", "data.max_pixels"):
                assert part in msg, (part, msg)


def test_max_pixels_replaces_pils_own_limit(tmp_path, monkeypatch):
    """PIL's bomb protection never preempts max_pixels: with Image.MAX_IMAGE_PIXELS far below
    the image, it decodes within max_pixels and without a limit (a stored image,
    FeatureStore.image), and is refused by max_pixels alone; the global is not changed."""
    import warnings

    from pipeline.core.errors import ImageTooLarge
    from pipeline.data import decode_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses > 200 px
    arr = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(decode_image(data, "a.png", 2400), arr)
        assert np.array_equal(decode_image(data, "a.png"), arr)
        with pytest.raises(ImageTooLarge, match=r"60x40 pixels"):
            decode_image(data, "a.png", 2399)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_file_too_long_for_max_pixels_is_not_read(tmp_path, monkeypatch):
    """A 10 GB ".jpg" (sparse) is refused from its size, never read into memory."""
    import os

    from pipeline.core.errors import ImageTooLarge
    from pipeline.data import max_file_bytes, read_bytes

    path = tmp_path / "huge.jpg"
    with open(path, "wb") as f:
        f.truncate(10 << 30)

    def no_read(*args, **kwargs):
        pytest.fail("the file was opened for reading")

    monkeypatch.setattr(os, "fdopen", no_read)
    with pytest.raises(ImageTooLarge) as e:
        read_bytes(path, "image", 40_000_000)
    assert str(path) in str(e.value) and "data.max_pixels = 40000000" in str(e.value)
    assert max_file_bytes(e.value.pixels) >= 10 << 30 > max_file_bytes(e.value.pixels - 1)
    monkeypatch.undo()
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 100)
    assert read_bytes(small, "image", 1) == b"x" * 100  # 16 MiB of slack for headers


def _isolated(code: str, timeout: int = 60):
    """Run `code` in a fresh Python in the repository, limited in time and to 2 GiB of
    address space: a regression that blocks or reads /dev/zero endlessly fails the test
    instead of hanging the suite or exhausting the machine's memory."""
    import resource
    import subprocess
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
    )


def test_fifo_and_device_are_refused_without_blocking(tmp_path):
    """A FIFO named x.jpg (whose plain open blocks) and a link y.jpg to /dev/zero (which never
    ends): one-line DataErrors naming the file, from read_bytes itself (race-free: checked on
    the open descriptor) and from listing, which reports them and lists the other images."""
    import os

    from pipeline.stages.extract_engine import decode

    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 1}, size=(32, 32))
    images = root / "train/disc/images"
    os.mkfifo(images / "x.jpg")
    (images / "y.jpg").symlink_to("/dev/zero")
    code = (
        "from pipeline.core.errors import DataError\n"
        "from pipeline.data import load_image, read_bytes\n"
        f"for p in {[str(images / 'x.jpg'), str(images / 'y.jpg')]!r}:\n"
        "    for read in (lambda p: read_bytes(p, 'image'), load_image):\n"
        "        try:\n"
        "            read(p)\n"
        "        except DataError as e:\n"
        "            print(e)\n"
    )
    r = _isolated(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == 2 * [f"{images / 'x.jpg'}: not a regular file (a FIFO)"] + 2 * [
        f"{images / 'y.jpg'}: not a regular file (a character device)"
    ]
    items, problems = list_items(root, "obj_seg", "train")
    assert len(items) == 2
    assert sorted(problems) == [
        f"{images / 'x.jpg'}: not a regular file (a FIFO)",
        f"{images / 'y.jpg'}: not a regular file (a character device)",
    ]
    # stage 1's decoder on an image swapped for a FIFO after listing (in this process: a
    # blocking open would be interrupted by the alarm)
    (images / "00000.jpg").unlink()
    os.mkfifo(images / "00000.jpg")
    with _alarm(20):
        d = decode(
            str(root), next(it for it in items if it.category == "disc"), 16, "crop", 40_000_000
        )
    assert d.error == f"{images / '00000.jpg'}: not a regular file (a FIFO)"


def test_read_error_names_the_file(tmp_path, monkeypatch):
    """EIO from a read names no file by itself: read_bytes, sha256_file and atomic_write_bytes
    name it, so the CLI's line is `<path>: Input/output error`."""
    import errno
    import os

    from pipeline.core.errors import os_error_line
    from pipeline.core.fsutil import atomic_write_bytes, sha256_file
    from pipeline.data import read_bytes

    with pytest.raises(DataError) as e:  # reading /proc/self/mem at offset 0 gives EIO
        read_bytes("/proc/self/mem", "image")
    assert str(e.value) == "/proc/self/mem: cannot read image (Input/output error)"
    with pytest.raises(OSError) as e:
        sha256_file(Path("/proc/self/mem"))
    assert os_error_line(e.value) == "/proc/self/mem: Input/output error"

    def eio(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", eio)
    target = tmp_path / "out" / "mask.png"
    with pytest.raises(OSError) as e:
        atomic_write_bytes(target, b"png")
    assert os_error_line(e.value) == f"{target}: Input/output error"
    assert not target.exists() and os.listdir(target.parent) == []  # no temporary left


def test_one_atomic_writer_and_its_temporaries(tmp_path):
    """Files and folders are written under temporary_name and renamed whole; what a killed
    writer leaves is what remove_temporaries deletes (all, or only a target's), never a
    complete file or another target's temporary."""
    from pipeline.core.fsutil import (
        atomic_file,
        atomic_folder,
        atomic_write_bytes,
        remove_temporaries,
        temporary_name,
    )

    target = tmp_path / "shard.h5"
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        assert tmp == temporary_name(target) and tmp.name.startswith(".shard.h5.")
        raise RuntimeError("killed")
    assert sorted(tmp_path.iterdir()) == []  # neither the target nor the temporary
    atomic_write_bytes(target, b"old")
    folder = tmp_path / "report_test_files"
    (folder).mkdir()
    (folder / "stale.jpg").write_bytes(b"x")
    with pytest.raises(RuntimeError), atomic_folder(folder) as tmp:
        (tmp / "new.jpg").write_bytes(b"y")
        raise RuntimeError("killed")
    assert [p.name for p in folder.iterdir()] == ["stale.jpg"]  # the old folder, intact
    with atomic_folder(folder) as tmp:
        (tmp / "new.jpg").write_bytes(b"y")
    assert [p.name for p in folder.iterdir()] == ["new.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report_test_files", "shard.h5"]

    # a killed writer's leftovers: a file, a folder and its aside copy, another target's
    left = [
        temporary_name(target),
        temporary_name(folder),
        temporary_name(folder, ".old"),
        temporary_name(tmp_path / "report_test_files.md"),
    ]
    left[0].write_bytes(b"half")
    for d in left[1:3]:
        d.mkdir()
        (d / "a.jpg").write_bytes(b"z")
    left[3].write_bytes(b"half")
    remove_temporaries(tmp_path, of=["report_test_files"])
    assert [p.exists() for p in left] == [True, False, False, True]
    remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report_test_files", "shard.h5"]
    assert target.read_bytes() == b"old"


def test_os_error_line_without_a_file():
    from pipeline.core.errors import os_error_line

    assert os_error_line(OSError(5, "Input/output error")) == "Input/output error"


def test_davis_split_list_with_latin1_names(tmp_path):
    """A split list holding Latin-1 bytes (an old archive) finds the files those bytes name."""
    import os

    root = make_dataset(tmp_path / "d", "davis2016", {"val": 1}, size=(32, 32))
    lst = root / "ImageSets/480p/val.txt"
    seqs = root / "JPEGImages/480p"
    first = sorted(os.listdir(seqs))[0]
    os.rename(os.fsencode(seqs / first), os.fsencode(seqs) + b"/caf\xe9")
    lst.write_bytes(
        lst.read_bytes().replace(f"JPEGImages/480p/{first}/".encode(), b"JPEGImages/480p/caf\xe9/")
    )
    items, problems = list_items(root, "davis2016", "val")
    assert problems == [] and len(items) == 2
    latin = [it for it in items if os.fsencode(it.category) == b"caf\xe9"]
    assert len(latin) == 1 and latin[0].mask is not None
    assert load_item(root, latin[0]).image.shape == (32, 32, 3)


def test_every_small_size_gets_a_canvas_of_the_box_size():
    """Sides one pixel short of a patch multiple (15, 479 with pad) once gave a canvas one
    pixel short (the crop fast path with top or left 0)."""
    import numpy as np

    from pipeline.data import fit_box, from_canvas, to_canvas

    for fit in ("crop", "pad"):
        for h in range(1, 40):
            for w in (1, 15, 16, 17, 31, 33):
                box = fit_box(h, w, 16, fit)
                canvas = to_canvas(np.zeros((h, w, 3), np.uint8), box)
                assert canvas.shape == (box.height, box.width, 3), (fit, h, w, box)
                assert from_canvas(np.zeros((1, box.height, box.width)), box, (h, w)).shape == (
                    1,
                    h,
                    w,
                )


def test_a_folder_of_the_tools_own_under_the_data_root_is_no_split(tmp_path):
    """paths.outputs (or paths.cache) pointed at the dataset: the run folder it creates there
    carries the marker and is not listed as a split (it would have no images, failing every
    later stage 1)."""
    from pipeline.core.owned import claim_folder, claim_run_dir
    from pipeline.data import list_splits
    from pipeline.data.synth import make_dataset

    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 2, "test": 2}, size=(32, 48))
    claim_run_dir(root / "default")
    claim_folder(root / "cache", "paths.cache")
    assert list_splits(root, "obj_seg") == ["test", "train"]
