"""Shared fixtures. Two run stores are made once per test run and shared (docs/testing.md):

- `smoke_baselines`: the smoke baseline (params/smoke.yaml) trained on both of its seeds, nothing else;
  `baseline_store` hands each test its own copy.
- `smoke_report`: every smoke-profile report built by `make report`'s pipeline (the notebooks through papermill),
  whose run store then holds a finished run of everything the smoke profile makes; `smoke_store` hands each test
  its own copy, in which the smoke stages find all their runs finished.

Tests change only their copies: the originals stay as they were made (test_notebook checks that a second build of
the reports finds them up to date).
"""
import shutil
import sys
from pathlib import Path

import pytest

from resnet_lab import params

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params"


@pytest.fixture
def smoke(tmp_path):
    """Validated smoke params writing into a temporary run store, without progress bars."""
    p = params.load(PARAMS / "smoke.yaml", "baseline")
    p.update(run_root=str(tmp_path / "runs"), progress=False)
    return p


def stage_params(file, stage, root, **changes):
    """A stage's params file validated with these changes, writing into the run store `root`, without progress bars."""
    p = params.load(PARAMS / file, stage)
    p.update(run_root=str(root), progress=False, **changes)
    return params.validate(p, stage)


def smoke_baseline(root):
    """Train the smoke baseline into the run store `root` (or reuse it there)."""
    from resnet_lab import baselines

    bp = params.load(PARAMS / "smoke.yaml", "baseline")
    bp.update(run_root=str(root), progress=False)
    return baselines.train(bp)


def copy_store(source, target):
    """A copy of the run store `source` at `target` (a run is found by its parameters, not by its folder, so every
    finished run of the copy is reused from there)."""
    shutil.copytree(source, target, symlinks=True)
    return Path(target)


def keep_only(root, reads):
    """Remove every run folder of the run store `root` but those of `reads` ("stage/key", as a stage's
    `result.reads()` lists what it read and made), and every other folder: the store of that stage alone."""
    root, keep = Path(root), {Path(r) for r in reads}
    for stage in [d for d in root.iterdir() if d.is_dir()]:
        for run in [d for d in stage.iterdir() if d.is_dir()]:
            if run.relative_to(root) not in keep:
                shutil.rmtree(run)
        if not any(d.is_dir() for d in stage.iterdir()):
            shutil.rmtree(stage)


@pytest.fixture(scope="session")
def smoke_replicates(tmp_path_factory):
    """The smoke baseline (params/smoke.yaml) trained on each of its seeds (0 and 1) into a fresh run store, once per
    test run: (its params, `baselines.replicates`' results). Read only: take `baseline_store` to write."""
    from resnet_lab import baselines

    bp = params.load(PARAMS / "smoke.yaml", "baseline")
    bp.update(run_root=str(tmp_path_factory.mktemp("smoke-baselines") / "runs"), progress=False)
    return bp, baselines.replicates(bp)


@pytest.fixture(scope="session")
def smoke_baselines(smoke_replicates):
    """The run store of `smoke_replicates`: the finished smoke baseline of both seeds, nothing else. Read only."""
    return Path(smoke_replicates[0]["run_root"])


@pytest.fixture
def baseline_store(smoke_baselines, tmp_path):
    """This test's own run store holding the finished smoke baseline of both seeds (`smoke_baselines`, copied)."""
    return copy_store(smoke_baselines, tmp_path / "store" / "runs")


@pytest.fixture(scope="session")
def smoke_report(tmp_path_factory):
    """Every smoke-profile report (params/report.yaml's smoke column), built once per test run by `make report`'s
    pipeline into a fresh run store: (reports folder, overrides). The notebooks train and make everything the smoke
    profile makes, so the store (overrides["run_root"]) then holds the baseline on both seeds, the Optuna study and
    its retrained recipe, every model of the 03, 04 and 05 smoke params files and the ONNX files 06 exported.
    Only test_notebook's build test writes here; other tests take a copy (`smoke_store`)."""
    from resnet_lab import report

    root = tmp_path_factory.mktemp("smoke-report")
    out, overrides = root / "reports", {"run_root": str(root / "runs"), "progress": False}
    assert report.build("smoke", out, overrides=overrides) == 0
    return out, overrides


@pytest.fixture
def smoke_store(smoke_report, tmp_path):
    """This test's own copy of the smoke report's run store (`smoke_report`): every smoke stage run there is
    reused, not recomputed."""
    return copy_store(smoke_report[1]["run_root"], tmp_path / "smoke" / "runs")


@pytest.fixture
def python():
    return sys.executable
