"""The model card (`models.json`, written last beside the trained models: their files'
checksums, training params and deps) and the model files' names, read without torch: what
`status` and `cache` need of a run's models, and the models' content fingerprint."""

from __future__ import annotations

from pathlib import Path

from ..core.fingerprints import fingerprint
from ..core.fsutil import read_json, sha256_bytes

HEAD_FILE = "linear_head.safetensors"
UPSAMPLER_FILE = "pac_upsampler.safetensors"
# the files of cards 1 and 2: {"state_dict": ...} written by torch.save (read with
# weights_only=True)
LEGACY_FILES = ("linear_head.pt", "pac_upsampler.pt")
CARD_FILE = "models.json"  # written last: names the files with their sha256
# The model card's format (see CHANGELOG.md). 1: the cards written before the key existed
# (they load as before); 2: with card_version and the upsampler's "pyramid"; 3: the files are
# safetensors (HEAD_FILE, UPSAMPLER_FILE; before: LEGACY_FILES, still read). A card of a
# newer version than this one is refused (a newer vit-objseg wrote it).
CARD_VERSION = 3


def model_files(card: dict) -> tuple[str, str]:
    """The (head, upsampler) file names a card of its card_version lists."""
    return (HEAD_FILE, UPSAMPLER_FILE) if card.get("card_version", 1) >= 3 else LEGACY_FILES


def read_card(model_dir: Path) -> tuple[dict | None, str]:
    """The model card (files' checksums, training params and deps), or None and why not;
    the files themselves are not read."""
    card = read_json(model_dir / CARD_FILE)
    if card is None:
        return None, (
            "no trained models"
            if not (model_dir / CARD_FILE).exists()
            else f"{model_dir / CARD_FILE} damaged"
        )
    try:
        files = card["files"]
        version = card.get("card_version", 1)
        ok = isinstance(version, int) and not isinstance(version, bool)
        if ok and version > CARD_VERSION:
            return None, (
                f"{model_dir / CARD_FILE} is of card version {version}, newer than "
                f"this vit-objseg reads ({CARD_VERSION}): upgrade vit-objseg, or "
                "retrain"
            )
        ok = (
            ok
            and isinstance(card["params"], dict)
            and isinstance(card["deps"], dict)
            and set(files) == set(model_files(card))
            and fingerprint(files) == card["fingerprint"]
        )
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        return None, f"{model_dir / CARD_FILE} damaged"
    return card, ""


def verified_bytes(model_dir: Path, card: dict, name: str) -> tuple[bytes | None, str]:
    """The bytes of the model file `name` as its card lists them, or (None, why not)."""
    try:
        data = (model_dir / name).read_bytes()
    except FileNotFoundError:
        return None, f"{model_dir / name} missing"
    listed = card["files"][name]
    if len(data) != listed["bytes"] or sha256_bytes(data) != listed["sha256"]:
        return None, f"{model_dir / name} damaged (fails its checksum)"
    return data, ""


def models_fingerprint(model_dir: Path) -> tuple[str | None, str]:
    """(content fingerprint, "") of intact trained models, or (None, why not)."""
    card, why = read_card(model_dir)
    if card is None:
        return None, why
    for name in model_files(card):
        _, why = verified_bytes(model_dir, card, name)
        if why:
            return None, why
    return card["fingerprint"], ""
