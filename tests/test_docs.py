"""The README and the documentation site (docs/, mkdocs.yml) say what the code does, once.

Nothing here reads a README heading: the README's parts that the site includes are found by
their snippet markers (`<!-- --8<-- [start:NAME] -->`), its table of keys by its
`config-table` markers, so headings can be renamed freely.
"""
import re
import tomllib
from pathlib import Path

import pytest

from pipeline.core.config import Config, all_keys

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 12 * 1024
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|(.*)\|\s*$")


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def _between(text: str, start: str, end: str) -> str:
    """The text between the line holding `start` and the next line holding `end`."""
    m = re.search(rf"{re.escape(start)}[^\n]*\n(.*?)\n[^\n]*{re.escape(end)}", text, re.S)
    assert m, f"no '{start}' ... '{end}' markers"
    return m.group(1)


def _table(text: str) -> dict[str, list[str]]:
    """Rows of the Markdown tables in `text` whose first cell is a `key`: key -> other cells."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = ROW.match(line.strip())
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} has two rows"
            rows[m.group(1)] = [c.strip() for c in m.group(2).split(" | ")]
    return rows


def _toml_literal(cell: str):
    m = re.fullmatch(r"`(.*)`", cell)
    assert m, f"a default should be a TOML literal in backticks, got {cell!r}"
    return tomllib.loads(f"v = {m.group(1)}")["v"]


# ----------------------------------------------------------------------------- the README

def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, \
        f"README.md is {size} bytes (at most {README_MAX_BYTES}): move the detail into docs/"


def test_readme_names_the_install_and_test_commands_ci_runs():
    """The README's install command is the one .ci/run runs, and so is its test command."""
    ci = (ROOT / ".ci" / "run").read_text()
    install = re.search(r"^python -m pip install .*$", ci, re.M)
    assert install, ".ci/run has no `python -m pip install` line"
    readme = README.read_text()
    assert install.group(0) in readme, f"README.md does not name CI's {install.group(0)!r}"
    assert re.search(r"^python -m pytest\b", ci, re.M) and "python -m pytest" in readme


def test_included_readme_sections_exist():
    """Each `--8<-- "README.md:NAME"` of a page has its start and end markers in the README."""
    readme = README.read_text()
    wanted = {m.group(1) for page in _pages()
              for m in re.finditer(r'--8<-- "README\.md:([\w-]+)"', page.read_text())}
    assert wanted, "no page includes a part of the README"
    for name in sorted(wanted):
        assert f"--8<-- [start:{name}]" in readme and f"--8<-- [end:{name}]" in readme, \
            f"README.md lacks the snippet markers of section {name!r} that docs/ includes"


def test_readme_key_table_agrees_with_the_config():
    """The README's short table of keys: real keys, their real defaults, the configuration
    page's meaning."""
    rows = _table(_between(README.read_text(), "config-table:start", "config-table:end"))
    assert rows, "README.md's config table is empty"
    reference = _table((DOCS / "configuration.md").read_text())
    for key, cells in rows.items():
        assert key in all_keys(), f"README's config table names an unknown key {key}"
        default, meaning = cells
        assert _toml_literal(default) == Config().get(key), f"README default of {key}"
        assert meaning and meaning in reference[key][1], \
            f"README's meaning of {key} is not the configuration page's"


# ----------------------------------------------------------------------------- the site

def test_configuration_page_documents_every_key_with_its_default():
    rows = _table((DOCS / "configuration.md").read_text())
    assert set(rows) == set(all_keys()), (
        f"missing: {sorted(set(all_keys()) - set(rows))}, "
        f"unknown: {sorted(set(rows) - set(all_keys()))}")
    for key, cells in rows.items():
        assert len(cells) == 3 and all(cells), f"{key} needs key | default | meaning | stale"
        actual = Config().get(key)
        documented = _toml_literal(cells[0])
        assert documented == actual and type(documented) is type(actual), \
            f"docs/configuration.md says {key} defaults to {cells[0]}, the code {actual!r}"


@pytest.mark.parametrize("path", [README, *_pages()], ids=lambda p: p.name)
def test_user_pages_name_no_shared_path(path):
    """A clone of the repository has no ../shared: only CONTRIBUTING.md (included by
    docs/development.md) and the measurements may name it."""
    assert "../shared" not in path.read_text(), f"{path.name} names a ../shared path"


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.name for p in _pages() if f" {p.name}" not in nav]
    assert not missing, f"docs pages not in mkdocs.yml's nav: {missing}"


def test_outputs_page_documents_every_report_field(trained):
    """Every top-level field of a real report_<split>.json has a row on the outputs page."""
    import json
    _, _, cfg = trained
    report = json.loads((cfg.run_dir / "report_test.json").read_text())
    rows = _table((DOCS / "outputs.md").read_text())
    missing = sorted(set(report) - set(rows))
    assert not missing, f"report_<split>.json fields missing from docs/outputs.md: {missing}"
