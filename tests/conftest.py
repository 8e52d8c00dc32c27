"""Shared fixtures. Two run stores are made once per test run and shared (docs/testing.md):

- `smoke_baselines`: the smoke baseline (params/smoke.yaml) trained on both of its seeds, nothing else;
  `baseline_store` hands each test its own copy.
- `smoke_reports`: the smoke-profile reports built by `make report`'s pipeline (the notebooks through papermill), each
  notebook when a test first needs it (`smoke_report`: all of them); their run store then holds a finished run of
  what those notebooks make, and `smoke_store(notebook, ...)` hands each test its own copy, in which the stages of
  those notebooks find all their runs finished.

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


class SmokeReports:
    """The smoke profile's reports (params/report.yaml's smoke column), built by `make report`'s pipeline (each
    notebook through papermill) into a fresh run store, each notebook once per test run and only when a test needs
    it. The notebooks train and make everything the smoke profile makes."""

    def __init__(self, root):
        self.out = Path(root) / "reports"
        self.overrides = {"run_root": str(Path(root) / "runs"), "progress": False}
        self.built = []

    def build(self, notebooks=None):
        """Build the reports of `notebooks` (with 01_baseline, which every stage starts from), or of every notebook of
        the profile when None. A notebook that reads the whole store (06, the last) is built only with all the others."""
        from resnet_lab import report

        plan = [name for name, _ in report.plan("smoke")]
        if notebooks is not None:
            assert plan[-1] not in notebooks, f"{plan[-1]} reads every run: ask for all the reports"
        wanted = plan if notebooks is None else [plan[0], *notebooks]
        todo = [name for name in plan if name in wanted and name not in self.built]
        if todo:
            # all of them in one build (those built already found up to date), as `make report` does: its stamps are
            # then taken as the last notebook leaves the store (06 adds each run's ONNX file)
            only = None if notebooks is None else todo
            assert report.build("smoke", self.out, only=only, overrides=self.overrides) == 0
            self.built += todo

    def copy(self, target, notebooks=None):
        """A copy at `target` of the run store once `notebooks` (all when None) have run (for a fixture of any
        scope: `smoke_reports.copy(tmp_path_factory.mktemp(...) / "runs", ["04_pruning"])`)."""
        self.build(notebooks)
        return copy_store(self.overrides["run_root"], target)


@pytest.fixture(scope="session")
def smoke_reports(tmp_path_factory):
    """The smoke reports of this test run (`SmokeReports`), each built when first asked for. Only test_notebook's build
    test writes to them or their store; other tests take a copy of the store (`smoke_store`)."""
    return SmokeReports(tmp_path_factory.mktemp("smoke-report"))


@pytest.fixture(scope="session")
def smoke_report(smoke_reports):
    """Every smoke report, built: (reports folder, overrides). Its run store (overrides["run_root"]) then holds the
    baseline on both seeds, the Optuna study and its retrained recipe, every model of the 03, 04 and 05 smoke params
    files and the ONNX files 06 exported."""
    smoke_reports.build()
    return smoke_reports.out, smoke_reports.overrides


@pytest.fixture
def smoke_store(smoke_reports, tmp_path):
    """`smoke_store("04_pruning", ...)`: this test's own copy of the smoke reports' run store once those notebooks
    (all of them when none is named) have run, so that the stage of each finds every one of its runs finished."""
    return lambda *notebooks: smoke_reports.copy(tmp_path / "smoke" / "runs", list(notebooks) or None)


@pytest.fixture
def python():
    return sys.executable
