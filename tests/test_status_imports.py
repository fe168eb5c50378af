"""`status` judges a run without torch (issue 28: torch's import is most of its time): the
modules on its path import none, and extract.precision "auto" is resolved without it where
CUDA cannot be available."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

# The modules of `status`'s path that must import no torch (workflow: the three stages).
STATUS_PATH = [
    "pipeline.stages.workflow",
    "pipeline.stages.train",
    "pipeline.stages.predict",
    "pipeline.stages.extract",
    "pipeline.stages.extract_record",
    "pipeline.commands.cache",
    "pipeline.models.card",
    "pipeline.models.devices",
]


def _run(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.parametrize("module", STATUS_PATH)
def test_the_status_path_imports_no_torch(module):
    out = _run(
        f"import sys\nimport {module}\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    assert out == "[]", (module, out)


def test_cuda_probe_without_torch_agrees_with_torch():
    out = _run(
        "import sys\n"
        "from pipeline.models.devices import cuda_available, resolve_precision\n"
        "probe = cuda_available(); auto = resolve_precision('auto', 'auto')\n"
        "import torch\n"
        "print(probe == torch.cuda.is_available(), auto == ('bf16' if probe else 'fp32'))"
    )
    assert out == "True True"


def test_extract_keeps_the_engine_names_its_callers_take():
    out = _run(
        "import pipeline.stages.extract as x, pipeline.stages.extract_engine as e\n"
        "print(all(getattr(x, n) is getattr(e, n) "
        "for n in ('Extractor', 'extractor_of', 'largest_first')))"
    )
    assert out == "True"
