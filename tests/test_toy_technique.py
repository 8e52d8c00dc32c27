"""A technique added in one file (tests/toy_technique.py) is taken up by the whole lab, no other file touched:
validated in a chain, made, reloaded exactly, listed and scored in the summary, timed in bench, exported to ONNX."""
import importlib

import pytest

from resnet_lab import bench, export, metrics, params, registry, summary
from resnet_lab.stages import pruning

from conftest import PARAMS, smoke_baseline
from conftest import stage_params


@pytest.fixture(scope="module")
def toy():
    module = importlib.import_module("toy_technique")
    yield module
    registry.unregister("toy")


def test_a_technique_in_one_file_is_chained_made_reloaded_scored_timed_and_exported(toy, tmp_path):
    root = tmp_path / "runs"
    smoke_baseline(root)
    # validated in a chain: its own settings, the closest key suggested, its range enforced
    with pytest.raises(params.ParamsError, match="did you mean 'bits'"):
        stage_params("pruning_smoke.yaml", "pruning", root, variants=[{"then": [{"toy": {"bit": 3}}]}])
    with pytest.raises(params.ParamsError, match=r"'variants\[0\]\.then\[0\]\.toy\.bits' = 9 is out of range"):
        stage_params("pruning_smoke.yaml", "pruning", root, variants=[{"then": [{"toy": {"bits": 9}}]}])
    p = stage_params("pruning_smoke.yaml", "pruning", root, epochs=1, sensitivity_amounts=[], curve_amounts=[],
                     variants=[{"method": "l1", "scope": "global", "amounts": [0.5], "then": [{"toy": {"bits": 3}}]}])
    result = pruning.run(p)
    name = "L1 unstructured, global, 50% → toy 3-bit classifier"
    made = result.models[-1]
    assert made.name == name and made.row["technique"] == "toy"
    assert made.row["reload_exact"] and made.run.path("toy.pt").is_file()  # its own file, reloaded bit for bit
    # its bit count, measured from the model: the classifier's weights hold at most 2^3 - 1 levels per channel
    assert made.row["toy_bits"] == 3 and metrics.layer_weight_bits(made.model.linear) == 3
    # listed and scored in the summary, under the notebook that made it
    sp = params.load(PARAMS / "summary_smoke.yaml", "summary")
    sp.update(run_root=str(root), progress=False, onnx=False, profile_groups=[])
    s = summary.run(params.validate(sp, "summary"))
    df = summary.table(s)
    assert df.loc[name, "technique"] == "toy" and df.loc[name, "course score"] > 0
    assert [e["notebook"] for e in s.runs if e["stage"] == "toy"] == ["04_pruning"]
    # timed in bench
    bp = params.validate({"baseline": "params/smoke.yaml", "run_root": str(root), "rounds": 1,
                          "measure_batch_size": 8}, "bench")
    assert name in bench.inference(bp)
    # exported to ONNX and checked against its PyTorch model on the test set
    e = export.export_run(made.run.dir)
    assert e.path.is_file() and e.agreement >= 99.0
