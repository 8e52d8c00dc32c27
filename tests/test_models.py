import torch
from torch import nn

from resnet_lab import metrics, models


def test_resnet18_counts_match_the_original_scripts():
    m = models.resnet18(64)
    assert metrics.count_params(m) == 11_173_962
    bn = sum(p.numel() for mod in m.modules() if isinstance(mod, nn.BatchNorm2d) for p in mod.parameters())
    assert bn == 9_600
    assert metrics.count_macs(m)["macs"] == 555_422_720


def test_per_stage_macs_match_facts():
    m = models.resnet18(64)
    parts = [(m.conv1, (1, 3, 32, 32), 1_769_472), (m.layer1, (1, 64, 32, 32), 150_994_944),
             (m.layer2, (1, 64, 32, 32), 134_217_728), (m.layer3, (1, 128, 16, 16), 134_217_728),
             (m.layer4, (1, 256, 8, 8), 134_217_728), (m.linear, (1, 512), 5_120)]
    for module, shape, expected in parts:
        assert metrics.count_macs(module, shape)["macs"] == expected


def test_width_scales_channels_and_output_shape():
    m = models.resnet18(16)
    assert m.conv1.out_channels == 16 and m.linear.in_features == 128
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # conv weights scale with width squared: at width 32 about a quarter of width 64's parameters
    ratio = metrics.count_params(models.resnet18(32)) / metrics.count_params(models.resnet18(64))
    assert 0.24 < ratio < 0.26
