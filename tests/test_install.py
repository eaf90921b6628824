"""A clean install: the wheel, installed into a fresh environment, runs the tiny job from outside the checkout
through its console script with the config shipped inside the package, and every run records the version.
Another package that shadows one of the project's top-level names is a clear ImportError."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import tomllib
from mlflow import MlflowClient

from tests.shared import LOG_LINE, REPO

SCRIPTS = ["ads-relevance-job", "ads-relevance-ingest", "ads-relevance-train", "ads-relevance-export",
           "ads-relevance-score", "ads-relevance-check", "ads-relevance-promote"]


def fresh_env(tmp_path: Path) -> tuple[Path, Path]:
    """(a new virtual environment with the wheel of this checkout installed, the wheel). The heavy
    dependencies (torch, DeepSpeed, MLflow, ...) are this environment's, seen through a .pth line that adds
    its site-packages after the fresh one (the line adds a folder; the checkout's editable-install hook in
    that folder is not run), so nothing is downloaded or copied."""
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("ads_relevance-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    fresh_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    Path(fresh_site, "_ads_relevance_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return venv, wheel


def test_the_wheel_runs_the_tiny_job_from_outside_the_checkout_and_records_its_version(tmp_path):
    venv, wheel = fresh_env(tmp_path)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    names = zipfile.ZipFile(wheel).namelist()
    assert "kernel/config/presets/tiny.yaml" in names and any(n.endswith("licenses/LICENSE") for n in names)
    assert all((venv / "bin" / s).is_file() for s in SCRIPTS)
    elsewhere = tmp_path / "elsewhere"  # no configs/, no checkout: only the installed package
    elsewhere.mkdir()
    # As an operator's shell has it: no PYTHONPATH, and no DS_ACCELERATOR (which `make` exports).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DS_ACCELERATOR")}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import kernel, job; print(kernel.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(venv)  # the wheel's code, not the checkout's
    job = subprocess.run([str(venv / "bin" / "ads-relevance-job"), "--config", "tiny", "train.max_steps=4",
                          "train.eval_every=4", "monitoring.bootstrap_rounds=5"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    # Every line of the log is the project's format (timestamp, level, step; a record's further lines
    # indented): no library prints in a format of its own.
    foreign = [line for line in job.stderr.splitlines()
               if line.strip() and not LOG_LINE.match(line) and not line.startswith("  ")]
    foreign += [line for line in job.stdout.splitlines() if line.startswith("[20")]  # "[2026-12-07 10:00:00,1]"
    assert not foreign, foreign  # stdout holds the summary only
    work = elsewhere / "runs" / "tiny"  # the shipped config's work_dir, relative to where the job runs
    summary = json.loads((work / "summary.json").read_text())
    assert (summary["version"], summary["git_commit"]) == (version, "unknown")  # no checkout: no commit
    assert json.loads((work / "export" / "manifest.json").read_text())["source"]["version"] == version
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert runs and all(r.data.tags["ads_relevance.version"] == version for r in runs)


def test_a_package_that_shadows_a_project_name_is_a_clear_import_error(tmp_path):
    """Another distribution's ``evaluation`` (or ``kernel``) earlier on the path: the first import of the
    project says which name, and where the other package lives."""
    for name in ("evaluation", "kernel"):
        other = tmp_path / name / name
        other.mkdir(parents=True)
        (other / "__init__.py").write_text('"""Some other project\'s package."""\n')
        env = dict(os.environ, PYTHONPATH=str(other.parent))
        proc = subprocess.run([sys.executable, "-c", "import job"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode != 0 and "ImportError" in proc.stderr
        assert f"{name!r} resolves to {other / '__init__.py'}" in proc.stderr, proc.stderr[-2000:]
        assert "not ads-relevance's" in proc.stderr
