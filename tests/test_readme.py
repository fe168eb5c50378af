"""The README documents every config key, and only existing ones, with its real default.

The table under "## Configuration keys" is checked against `pipeline.config`, so a key added
to the config (or renamed, or given another default) without a README row fails here.
"""
import re
import tomllib
from pathlib import Path

import pytest

from pipeline.core.config import Config, all_keys

README = Path(__file__).resolve().parent.parent / "README.md"
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|(.*)\|\s*$")


def _section(text: str, title: str) -> str:
    """The body of the `## title` section (up to the next `## ` heading)."""
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


def _rows() -> dict[str, list[str]]:
    """Config-table rows: key -> the other cells."""
    rows: dict[str, list[str]] = {}
    for line in _section(README.read_text(), "Configuration keys").splitlines():
        m = ROW.match(line.strip())
        if not m:
            continue
        key = m.group(1)
        assert key not in rows, f"config key {key} has two rows in the README table"
        rows[key] = [c.strip() for c in m.group(2).split(" | ")]
    return rows


def test_every_config_key_is_documented():
    documented = set(_rows())
    missing = [k for k in all_keys() if k not in documented]
    assert not missing, f"config keys missing from the README's configuration table: {missing}"


def test_no_row_names_an_unknown_key():
    unknown = sorted(set(_rows()) - set(all_keys()))
    assert not unknown, f"README configuration table names keys that do not exist: {unknown}"


def test_rows_have_default_meaning_and_stage():
    for key, cells in _rows().items():
        assert len(cells) == 3 and all(cells), \
            f"README row of {key} needs 4 non-empty cells (key | default | meaning | stale)"


@pytest.mark.parametrize("key", all_keys())
def test_documented_default_matches_config(key):
    cells = _rows().get(key)
    if cells is None:
        pytest.skip(f"{key} is not documented (reported by test_every_config_key_is_documented)")
    m = re.fullmatch(r"`(.*)`", cells[0])
    assert m, f"README default of {key} should be a TOML literal in backticks, got {cells[0]!r}"
    documented = tomllib.loads(f"v = {m.group(1)}")["v"]
    actual = Config().get(key)
    assert documented == actual and type(documented) is type(actual), \
        f"README says {key} defaults to {m.group(1)}, pipeline/core/config.py says {actual!r}"


def test_no_leftover_placeholders():
    text = README.read_text()
    for placeholder in ("CONFIG_TABLE", "TODO"):
        assert placeholder not in text, f"README.md still contains the placeholder {placeholder}"
