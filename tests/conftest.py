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


@pytest.fixture
def python():
    return sys.executable
