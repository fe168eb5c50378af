"""Make the documentation's two pictures from the offline demo (not part of the site build).

    python docs/tools/pictures.py [--work DIR]

Runs `cli.py demo` in DIR (a new temporary folder by default), then writes
- `docs/assets/report.png`: headless Chromium's screenshot of the top of the demo's HTML
  report (needs `chromium` on PATH);
- `docs/assets/masks.jpg`: two of the report's strips of its worst images (a rectangle and a
  disc in the demo's data), under a row of labels: image, annotation, then the errors of
  each variant (green: found, red: false object, blue: missed).
The screenshot is stored as an 8-bit palette PNG, the textured masks as a JPEG, to stay small.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "docs" / "assets"
LABELS = ("image", "annotation", "linear, nearest", "linear, bilinear", "PAC upsampler")
STRIPS = ("worst_01.jpg", "worst_03.jpg")  # of different categories in the demo
REPORT_VIEW = (1200, 1250)  # CSS px of the screenshot: header, settings, overall, sweep top


def run_demo(work: Path) -> Path:
    """`cli.py demo` in `work`; the demo run's folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "demo"], cwd=work, env=env, check=True)
    return work / "outputs" / "demo"


def palette_png(image: Image.Image, path: Path) -> None:
    """`image` as an optimised 256-colour PNG."""
    image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
        path, optimize=True
    )


def report_picture(run: Path, out: Path) -> None:
    """Headless Chromium's screenshot of `run`'s report_test.html."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--window-size={REPORT_VIEW[0]},{REPORT_VIEW[1]}",
                f"--screenshot={shot}",
                (run / "report_test.html").as_uri(),
            ],
            check=True,
            capture_output=True,
        )
        palette_png(Image.open(shot), out)


def masks_picture(run: Path, out: Path, width: int = 900) -> None:
    """The worst two variant strips of `run`'s report, labelled, `width` px wide."""
    files = [run / "report_test_files" / name for name in STRIPS]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"no such strip: {', '.join(missing)}")
    strips = [Image.open(f).convert("RGB") for f in files]
    scale = width / strips[0].width
    strips = [
        s.resize((width, round(s.height * width / s.width)), Image.Resampling.LANCZOS)
        for s in strips
    ]
    font = ImageFont.load_default(size=max(11, round(15 * scale * 1.5)))
    label_h, gap = font.size + 10, 4
    sheet = Image.new("RGB", (width, label_h + sum(s.height + gap for s in strips)), "white")
    draw = ImageDraw.Draw(sheet)
    cell = width / len(LABELS)
    for i, label in enumerate(LABELS):
        w = draw.textlength(label, font=font)
        draw.text((i * cell + (cell - w) / 2, 4), label, fill=(40, 40, 40), font=font)
    y = label_h
    for s in strips:
        sheet.paste(s, (0, y))
        y += s.height + gap
    sheet.save(out, quality=80, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="folder to run the demo in")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="vit-objseg-pictures-"))
    work.mkdir(parents=True, exist_ok=True)
    run = run_demo(work)
    ASSETS.mkdir(parents=True, exist_ok=True)
    report_picture(run, ASSETS / "report.png")
    masks_picture(run, ASSETS / "masks.jpg")
    for name in ("report.png", "masks.jpg"):
        print(f"{ASSETS / name}: {(ASSETS / name).stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
