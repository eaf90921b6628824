"""The layering is enforced, not described: import-linter's contracts (pyproject.toml) fail on an upward
import, on an import that the README's layer table does not list for the package, an import of tests or
benchmarks from product code, and an import loop inside a package."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.shared import REPO

PACKAGES = ["kernel", "modeling", "evaluation", "pipeline", "features", "training", "serving", "monitoring", "job",
            "benchmarks", "tests"]


def lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))  # the copy's packages, not the installed ones
    return subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def copy_of_the_code(tmp_path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_code_keeps_every_contract():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert result.stdout.count("KEPT") == len(contracts) >= 9  # every contract ran, none was dropped


@pytest.mark.parametrize("module,line,broken", [
    ("kernel/errors.py", "import job.run", "Stages import only downward"),
    ("serving/export/cli.py", "import training.trainer", "Stages import only downward"),  # siblings are independent
    ("serving/registry/cache.py", "import serving.scoring.scorer", "Serving's wings import downward"),
    ("serving/scoring/scorer.py", "import serving.scoring.worker", "Scoring's call chain goes one way"),
    ("modeling/mtl_lora.py", "import tests.shared", "Product code never imports tests or benchmarks"),
    ("kernel/errors.py", "import kernel.config", "No import loop between the modules of a package"),  # config -> errors
    # Below the layer, yet not in the package's row of the README's table:
    ("training/compare.py", "import pipeline.reader",
     "training imports features, modeling, evaluation and kernel only"),
    ("features/sampler.py", "import evaluation.metrics", "features imports modeling and kernel only"),
    ("monitoring/promote.py", "import modeling.merge",
     "monitoring imports serving, pipeline, evaluation and kernel only"),
])
def test_a_wrong_import_breaks_a_contract(copy_of_the_code, module, line, broken):
    path = copy_of_the_code / module
    path.write_text(path.read_text() + f"\n{line}  # the import under test\n")
    result = lint(copy_of_the_code)
    assert result.returncode != 0
    assert f"{broken} BROKEN" in result.stdout, result.stdout[-3000:]
