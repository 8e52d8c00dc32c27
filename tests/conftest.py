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
    """Train the smoke baseline into the run store `root` (for module-scoped stores of the step tests)."""
    from resnet_lab import baselines

    bp = params.load(PARAMS / "smoke.yaml", "baseline")
    bp.update(run_root=str(root), progress=False)
    return baselines.train(bp)


@pytest.fixture
def python():
    return sys.executable
