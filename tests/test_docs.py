"""The README, the documentation site (docs/, mkdocs.yml), `--help` and
`config show --explain` say what the code does, from one source each.

Every config key is documented with its field (`key(...)` in pipeline/core/config/schema.py):
a key added without it fails test_every_config_key_is_documented. Nothing here reads a README
heading: the README's parts that the site includes are found by their snippet markers
(`<!-- --8<-- [start:NAME] -->`), its table of keys by its `config-table` markers.
"""

import importlib.util
import json
import re
from pathlib import Path

import click
import pytest

from pipeline.core.config import (
    LIST_LENGTHS,
    ODD,
    RANGES,
    Config,
    ConfigError,
    all_keys,
    allowed_text,
    key_docs,
    load_config,
    toml_literal,
)
from tests.conftest import run_cli

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
    """Rows of the Markdown tables in `text` whose first cell is a `name`: name -> cells."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = ROW.match(line.strip())
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} has two rows"
            rows[m.group(1)] = [c.strip() for c in m.group(2).split(" | ")]
    return rows


def _hooks():
    """docs/hooks/generated.py, the site's generator (imported by path: not a package)."""
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- the README


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes (at most {README_MAX_BYTES}): move the detail into docs/"
    )


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
    wanted = {
        m.group(1)
        for page in _pages()
        for m in re.finditer(r'--8<-- "README\.md:([\w-]+)"', page.read_text())
    }
    assert wanted, "no page includes a part of the README"
    for name in sorted(wanted):
        assert f"--8<-- [start:{name}]" in readme and f"--8<-- [end:{name}]" in readme, (
            f"README.md lacks the snippet markers of section {name!r} that docs/ includes"
        )


def test_readme_key_table_is_generated_from_the_fields():
    """Each row of the README's short table is what the site's generator makes of the key's
    field: a real key, its default, its meaning."""
    table = _between(README.read_text(), "config-table:start", "config-table:end")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert rows, "README.md's config table is empty"
    hooks = _hooks()
    for row in rows:
        key = row.split("`")[1]
        assert key in all_keys(), f"README's config table names an unknown key {key}"
        assert row == hooks.readme_row(key), (
            f"README.md's row of {key} is out of date; it should read:\n{hooks.readme_row(key)}"
        )


# ----------------------------------------------------------------------------- config keys


def test_every_config_key_is_documented():
    """Every field is declared with key(default, meaning, stale=..., ...): its meaning is a
    sentence, it says what a change makes stale, and its `see` page exists."""
    docs = key_docs()
    missing = [k for k in all_keys() if k not in docs]
    assert not missing, (
        f"config keys without documentation: {missing}; declare each as "
        '`name: T = key(default, "Meaning.", stale=..., range=...)` in '
        "pipeline/core/config/schema.py"
    )
    for k, doc in docs.items():
        assert doc.meaning[:1].isupper() and doc.meaning.endswith("."), (
            f"{k}: the meaning should be a sentence: {doc.meaning!r}"
        )
        assert doc.stale, f"{k}: say what a change makes stale (STALE_* or a phrase)"
        if doc.see:
            page = DOCS / doc.see.split("#")[0]
            assert page.is_file(), f"{k}: see={doc.see!r}, but there is no {page}"


def test_every_numeric_key_declares_a_range_and_every_string_its_rule():
    defaults = Config()
    for k in all_keys():
        value = defaults.get(k)
        if isinstance(value, (int, float, list)) and not isinstance(value, bool):
            assert k in RANGES, f"{k} is numeric: declare its range (key(..., range=Range(..)))"
        if isinstance(value, str):
            assert allowed_text(k), f"{k}: declare its choices, or what it allows (allowed=...)"


def _value(key: str, v: float):
    """`v` as a value of `key` (an int key: int; a list key: a valid list around `v`)."""
    integer = not isinstance(Config().get(key), float)
    v = int(v) if integer else v
    if key in LIST_LENGTHS:
        return [v, 1]
    return v


@pytest.mark.parametrize("key", sorted(RANGES))
def test_documented_range_is_the_enforced_one(key):
    """No page states a range the code does not enforce: the range the docs give (from the
    field) is what load_config accepts, and one step past each end is refused with it."""
    integer = not isinstance(Config().get(key), float)
    rng = RANGES[key]
    step = 1 if integer else 1e-6
    inside = [rng.lo + step if rng.lo_open else rng.lo, rng.hi - step if rng.hi_open else rng.hi]
    outside = [rng.lo if rng.lo_open else rng.lo - step, rng.hi if rng.hi_open else rng.hi + step]
    if key in ODD:
        inside = [v if v % 2 else v - 1 for v in inside]
    for v in inside:
        assert load_config(None, [f"{key}={json.dumps(_value(key, v))}"]) is not None
    for v in outside:
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}={json.dumps(_value(key, v))}"])
        assert allowed_text(key) in str(e.value), (key, str(e.value))


def test_no_page_writes_a_rule_by_hand():
    """The configuration page is generated (its source holds the marker, not the keys); no
    hand-written page or the README writes out what a key allows."""
    assert "<!-- config-reference -->" in (DOCS / "configuration.md").read_text()
    for path in [README, *_pages()]:
        text = path.read_text()
        assert not re.search(r"\ballowed:", text), f"{path.name} states an `allowed:` by hand"
        for k in RANGES:
            assert not re.search(rf"`{re.escape(k)}`[^\n|]{{0,60}}\b\d+ to \d+", text), (
                f"{path.name} gives a range of {k} by hand: link the configuration page"
            )


def test_configuration_reference_has_every_key_with_its_default_and_rule():
    text = _hooks().config_reference()
    defaults, docs = Config(), key_docs()
    for k in all_keys():
        assert f"### `{k}` {{#{k}}}" in text, k
        block = text.split(f"{{#{k}}}", 1)[1].split("### ", 1)[0]
        assert docs[k].meaning in block and docs[k].stale in block, k
        assert f"- default: `{toml_literal(defaults.get(k))}`" in block, k
        if allowed_text(k):
            assert f"- allowed: {allowed_text(k)}" in block, k


def test_config_show_explain_prints_the_field_documentation():
    r = run_cli("config", "show", "--explain", "train.lr", "--set", "train.lr=1e-3")
    assert r.returncode == 0, r.stderr
    doc = key_docs()["train.lr"]
    assert r.stdout.splitlines()[0] == "train.lr = 0.001  (default: 0.002)"
    for part in (
        doc.meaning,
        f"allowed: {allowed_text('train.lr')}",
        f"a change makes stale: {doc.stale}",
    ):
        assert part in r.stdout, (part, r.stdout)
    bad = run_cli("config", "show", "--explain", "train.lrr")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "train.lrr" in bad.stderr and "did you mean train.lr?" in bad.stderr


# ----------------------------------------------------------------------------- --help

PIPELINE_ORDER = [
    "extract-features",
    "train-head",
    "predict",
    "run",
    "status",
    "segment",
    "export",
    "runs",
    "config",
    "cache",
    "demo",
]


def _commands() -> list[tuple[str, click.Command]]:
    """(path, command) of every command and subcommand of the CLI."""
    from cli import cli

    out = []
    for name, command in cli.commands.items():
        out.append((name, command))
        out += [(f"{name} {sub}", c) for sub, c in getattr(command, "commands", {}).items()]
    return out


def test_help_lists_the_commands_in_pipeline_order_one_line_each():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    listing = r.stdout.split("Commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split()[0] for line in listing] == PIPELINE_ORDER, listing
    for line in listing:
        assert not line.rstrip().endswith("..."), f"truncated: {line!r} (set short_help)"
        assert len(line.split(None, 1)) == 2, f"no summary: {line!r}"


def _make_paths(args: list[str], folder: Path) -> None:
    """Create under `folder` the files and folders an example names as arguments (segment's
    images), so that click's `exists=True` finds them."""
    for a in args:
        if not a.startswith("-") and re.fullmatch(r"[\w./]+\.(jpg|png)|[\w.]+/", a):
            target = folder / a
            if a.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()


@pytest.mark.parametrize("path, command", _commands(), ids=[p for p, _ in _commands()])
def test_help_ends_with_real_examples(path, command, tmp_path, monkeypatch):
    """Every command's --help ends with one or two examples of that command, and each parses
    (its options exist, its --set keys and values are valid config)."""
    from cli import cli

    root = click.Context(cli, info_name="python cli.py")
    lines = command.get_help(click.Context(command, parent=root, info_name=path)).splitlines()
    assert "  Examples:" in lines, f"`{path} --help` has no examples"
    examples = [t.strip() for t in lines[lines.index("  Examples:") + 1 :] if t.strip()]
    assert 1 <= len(examples) <= 2 and lines[-1].strip() == examples[-1], lines
    monkeypatch.chdir(tmp_path)
    for line in examples:
        assert line.startswith(f"python cli.py {path}"), line
        args = [
            a.strip("'") for a in line.removeprefix(f"python cli.py {path}").split(">")[0].split()
        ]
        load_config(None, [args[i + 1] for i, a in enumerate(args) if a == "--set"])
        _make_paths(args, tmp_path)
        command.make_context(path.split()[-1], args, parent=root)  # a usage error raises


# ----------------------------------------------------------------------------- the site


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
    _, _, cfg = trained
    report = json.loads((cfg.run_dir / "report_test.json").read_text())
    rows = _table((DOCS / "outputs.md").read_text())
    missing = sorted(set(report) - set(rows))
    assert not missing, f"report_<split>.json fields missing from docs/outputs.md: {missing}"
