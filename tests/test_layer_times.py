"""Where a model's CPU time goes (resnet_lab/layer_times.py): torch.profiler's ops attributed to layers and kinds."""
import copy
import math

import pytest
import torch
from torch import nn

from resnet_lab import layer_times, metrics, models
from resnet_lab import techniques as T


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return models.resnet18(8).eval()


def test_every_conv_and_linear_layer_is_named_with_its_stage_and_macs(net):
    prof = layer_times.profile(net, 4, rounds=1, repeats=2, cost=0.5)
    kinds = {r["layer"]: r["kind"] for r in prof.layers}
    assert kinds["conv1"] == "conv · stem" and kinds["layer1.0.conv1"] == "conv · stage 1"
    assert kinds["layer4.1.conv2"] == "conv · stage 4" and kinds["layer2.0.shortcut.0"] == "conv · stage 2"
    assert kinds[[n for n, m in net.named_modules() if isinstance(m, nn.Linear)][0]] == "linear"
    assert sum(r["macs"] for r in prof.layers) == metrics.count_macs(net)["macs"]  # the same count as everywhere
    assert all(r["ms"] > 0 for r in prof.layers)


def test_the_kinds_of_work_add_up_to_the_profiled_forward(net, monkeypatch):
    # without `cost`, profile measures the profiler's own cost itself: here on 20 pairs of forwards, not 200
    real_event_cost, measured = layer_times.event_cost, []
    monkeypatch.setattr(layer_times, "event_cost", lambda pairs=200: measured.append(real_event_cost(pairs=20)) or measured[-1])
    prof = layer_times.profile(net, 4, rounds=2, repeats=2)
    assert len(measured) == 1 and prof.event_cost_us == measured[0]
    assert set(prof.categories) == set(layer_times.CATEGORIES)
    assert sum(prof.categories.values()) == pytest.approx(prof.total_ms, rel=1e-6)
    convs = sum(prof.categories[k] for k in layer_times.STAGES)
    assert convs == pytest.approx(sum(r["ms"] for r in prof.layers if r["kind"] != layer_times.LINEAR), rel=1e-6)
    assert prof.categories[layer_times.ELEMENTWISE] > 0  # BatchNorm, ReLU and the residual adds
    assert prof.categories[layer_times.CONVERT] == 0  # a float model converts nothing
    assert prof.measured_ms > 0 and prof.event_cost_us >= 0


def test_an_int8_model_shows_its_quantize_and_dequantize(net):
    from resnet_lab.data import Split, Batches

    x = torch.randn(16, 3, 32, 32)
    q = T.int8.quantize(copy.deepcopy(net), Batches(Split(x, torch.zeros(16, dtype=torch.long)), 8, "cpu"), "x86")
    prof = layer_times.profile(q, 2, rounds=1, repeats=2, cost=0.5)
    assert prof.categories[layer_times.CONVERT] > 0
    assert {r["kind"] for r in prof.layers} >= {"conv · stem", "conv · stage 4", "linear"}


def test_a_model_whose_ops_change_between_forwards_is_refused():
    class Flaky(nn.Module):
        calls = 0

        def forward(self, x):
            Flaky.calls += 1
            return x.relu() if Flaky.calls % 2 else x.sigmoid()

    with pytest.raises(RuntimeError, match="not deterministic"):
        layer_times.profile(Flaky(), 2, rounds=1, repeats=2, warmup=0, cost=0.5)


def test_only_the_forwards_meant_to_be_recorded_are(net):
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        plain, events = layer_times._pairs(net, x, 3)
    convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert len(plain) == 3 and len(layer_times._forwards(events)) == 4  # the warm-up and 3 recorded, 3 timed apart
    assert sum(e.name == "aten::conv2d" for e in events) == 4 * convs
    # the profiler's cost per op is a timing (a difference of two): a finite number, its sign left to the machine
    assert math.isfinite(layer_times.event_cost(pairs=20))
