import torch
from torch import nn

from resnet_lab import metrics


def test_macs_by_hand_on_a_tiny_net_dense_and_sparse():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True), nn.ReLU(), nn.BatchNorm2d(4),
                        nn.Conv2d(4, 8, 1, groups=2), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    conv1 = 4 * 4 * (3 * 3 * 3 * 4)  # 8x8 input, stride 2 -> 4x4 outputs
    conv2 = 4 * 4 * (1 * 1 * 2 * 8)  # grouped: C_in / groups = 2
    fc = 128 * 5
    counts = metrics.count_macs(net, (2, 3, 8, 8))
    assert counts == {"macs": conv1 + conv2 + fc, "sparse_macs": conv1 + conv2 + fc}
    with torch.no_grad():
        net[0].weight[:2] = 0  # two of four filters zeroed
        net[5].weight[:, :64] = 0  # half the linear inputs zeroed
    assert metrics.count_macs(net, (1, 3, 8, 8))["sparse_macs"] == conv1 // 2 + conv2 + fc // 2


def test_counts_size_and_speed():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    n = 3 * 8 * 9 + 8 * 900 * 10 + 10
    assert metrics.count_params(net) == n
    with torch.no_grad():
        net[0].weight.zero_()
    assert metrics.count_nonzero(net) == n - 3 * 8 * 9 - (net[2].bias == 0).sum().item()
    size = metrics.saved_size(net)
    assert 4 * n < size < 4 * n + 4096  # float32 payload plus a small archive overhead
    s = metrics.speed(net, batch_size=4, warmup=1, repeats=3)
    assert s["throughput_img_s"] > 0 and s["latency_ms"] > 0 and s["batch_size"] == 4


def test_confusion_matrix_counts_true_by_predicted():
    cm = metrics.confusion_matrix(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
