"""`make bench`: training throughput of the project's data pipeline, side by side with
(a) the pure-compute limit (the same model stepping on one fixed, pre-made batch) and
(b) a stock pipeline (PIL images + torchvision transforms + DataLoader), same model and batch;
then CPU inference of every finished compressed model of the baseline, side by side with it.

The three are timed in interleaved rounds in one process and the median round is kept, so drift
of the machine hits all of them alike. Only the data path differs: every pipeline hands the model
its batch in the same memory format on the same device.
"""
from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from . import data as data_mod
from . import baselines, export, metrics, models, registry, runs, train


class StockCIFAR(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: a PIL image from HWC uint8, then transforms."""

    def __init__(self, images_nchw: torch.Tensor, labels: torch.Tensor):
        from torchvision import transforms as T

        self.images = images_nchw.permute(0, 2, 3, 1).numpy()
        self.labels = labels.tolist()
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(data_mod.MEAN, data_mod.STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def _forever(make_iter: Callable[[int], Iterator]) -> Iterator:
    for epoch in itertools.count():
        yield from make_iter(epoch)


def run(p: dict) -> dict:
    """Measure the three pipelines for bench params `p`; return throughputs (img/s) and ratios."""
    device = train.pick_device(p["device"])
    dataset = data_mod.from_params(p)
    torch.manual_seed(p["seed"])
    model = models.resnet18(p["width"])
    fmt = torch.channels_last if train.train_channels_last(device, model) else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    loss_fn = nn.CrossEntropyLoss()
    dtype = train.amp_dtype("auto", device)
    bs = p["batch_size"]

    ours = data_mod.Batches(dataset.train, bs, device, train=True, seed=p["seed"], channels_last=fmt == torch.channels_last)

    def our_epoch(epoch):
        ours.set_epoch(epoch)
        return iter(ours)

    fixed_x, fixed_y = next(iter(ours))
    loader = torch.utils.data.DataLoader(StockCIFAR(dataset.train.images, dataset.train.labels), batch_size=bs,
                                         shuffle=True, drop_last=True, num_workers=p["stock_workers"],
                                         pin_memory=device.type == "cuda")

    def stock_batches():
        for x, y in _forever(lambda e: iter(loader)):
            yield x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True)

    # Each round starts a fresh iterator and closes it after timing: the stock workers are started
    # in the untimed warm-up and shut down before the next pipeline is timed, so their prefetching
    # never steals the CPU from another pipeline's measurement.
    sources = {"pipeline": lambda: _forever(our_epoch), "limit": lambda: itertools.repeat((fixed_x, fixed_y)),
               "stock": stock_batches}

    def step(x, y):
        with train.autocast(device, dtype):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rates: dict[str, list[float]] = {k: [] for k in sources}
    for _ in range(p["rounds"]):
        for name, make in sources.items():
            batches = make()
            for _ in range(p["warmup_steps"]):
                step(*next(batches))
            metrics.sync(device)
            t0 = time.perf_counter()
            for _ in range(p["steps"]):
                step(*next(batches))
            metrics.sync(device)
            rates[name].append(p["steps"] * bs / (time.perf_counter() - t0))
            if hasattr(batches, "close"):
                batches.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"device": str(device), "machine": metrics.machine(), "batch_size": bs, "width": p["width"],
            "stock_workers": p["stock_workers"], "img_per_s": med, "rounds": rates,
            "pipeline_over_limit": med["pipeline"] / med["limit"], "pipeline_over_stock": med["pipeline"] / med["stock"]}


def describe(r: dict) -> str:
    lines = [f"Training throughput, ResNet18 width {r['width']}, batch {r['batch_size']}, device {r['device']}",
             f"machine: {r['machine']}"]
    lines += [f"  {k:<9} {v:8.1f} img/s   (rounds: {', '.join(f'{x:.1f}' for x in r['rounds'][k])})"
              for k, v in r["img_per_s"].items()]
    lines += [f"  pipeline / limit = {r['pipeline_over_limit']:.3f}",
              f"  pipeline / stock = {r['pipeline_over_stock']:.3f}   (stock DataLoader with {r['stock_workers']} workers)"]
    return "\n".join(lines)


# ---------------------------------------------------------------- inference of the compressed models
def inference(p: dict) -> dict | None:
    """CPU throughput of the baseline of `p['baseline']` and of every finished compressed run made from it, in
    eager PyTorch and in ONNX Runtime (each model exported to a temporary ONNX file), all measured side by side
    (interleaved rounds); None when that baseline has not been trained yet."""
    try:
        base, _ = baselines.trained(p["baseline"], p)
    except baselines.UpstreamMissing as e:
        print(f"inference: skipped ({e})")
        return None
    models_ = {"FP32 (baseline)": base.model.eval()}
    store = runs.RunStore(p["run_root"])
    for kind, tech in registry.techniques().items():
        for run in store.runs(kind) if tech.is_step else []:
            if run.done and run.params.get("baseline") == base.run.key:
                name = run.metrics["label"]
                models_[name if name not in models_ else f"{name} [{run.key}]"] = tech.load(run)
    with tempfile.TemporaryDirectory() as tmp:
        engines = {(export.PYTORCH, name): m for name, m in models_.items()}
        engines |= {(export.ORT, name): export.OrtModel(export.to_onnx(m, Path(tmp) / f"{i}.onnx"))
                    for i, (name, m) in enumerate(models_.items())}
        speed = metrics.compare_speed(engines, p["measure_batch_size"], rounds=p["rounds"])
    ref = speed[export.PYTORCH, "FP32 (baseline)"]["throughput_img_s"]
    ref_macs = metrics.count_macs(base.model)["macs"]
    out = {}
    for name, m in models_.items():
        s = speed[export.PYTORCH, name]
        ort_s = speed[export.ORT, name]
        out[name] = {**s, "speedup_vs_fp32": s["throughput_img_s"] / ref,
                     "mac_reduction": ref_macs / metrics.count_macs(m)["macs"],
                     "onnxruntime_throughput_img_s": ort_s["throughput_img_s"],
                     "onnxruntime_speedup_vs_fp32": ort_s["throughput_img_s"] / ref}
    return out


def describe_inference(r: dict) -> str:
    first = next(iter(r.values()))
    lines = [f"CPU inference, batch {first['batch_size']}, {first['threads']} threads (median of interleaved rounds), "
             "eager PyTorch and ONNX Runtime; every speed-up is over the eager PyTorch FP32 baseline"]
    lines += [f"  {name:<52} {s['throughput_img_s']:8.0f} img/s  {s['latency_ms']:7.1f} ms  {s['speedup_vs_fp32']:5.2f}x FP32"
              f"   ONNX Runtime {s['onnxruntime_throughput_img_s']:8.0f} img/s  {s['onnxruntime_speedup_vs_fp32']:5.2f}x FP32 (PyTorch)"
              + (f"  ({s['mac_reduction']:.2f}x fewer MACs: speed-up / MAC reduction = "
                 f"{s['speedup_vs_fp32'] / s['mac_reduction']:.2f})" if s["mac_reduction"] > 1.001 else "")
              for name, s in r.items()]
    return "\n".join(lines)
