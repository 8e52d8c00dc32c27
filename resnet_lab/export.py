"""Deployable models: any model of the run store as an ONNX file, checked against its PyTorch model on the whole
test set and run in ONNX Runtime, the engine people deploy with.

- `graph_of(model)`: the module that is exported. A float model (dense, unstructured-pruned with its zeros, compact
  structured, SVD-factorized, BinaryConnect with its ±α weights) is itself. An FP16/BF16 model exports as the
  float32 graph of its rounded weights: ONNX Runtime's CPU provider has no bfloat16 convolution, and the half graph
  (half convolutions, float32 BatchNorm) is refused by its type checker. An INT8 model exports as itself.
- `to_onnx(model, path)`: torch's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`, opset 17,
  a dynamic batch axis), for two measured reasons: it is the only one of torch 2.14's exporters that exports the
  lab's INT8 models (FX-quantized GraphModules, which `torch.export` cannot trace: the dynamo exporter fails at its
  step 1), so the ONNX INT8 graph carries the lab's own scales and zero points (QuantizeLinear / QLinearConv /
  DequantizeLinear), not a second, different quantization; and it exports a float ResNet18 in 0.2 s where the
  dynamo exporter takes 5-7 s (27 models: seconds instead of minutes of a report). Float graphs of both exporters
  give the same logits (max difference 1.5e-8 on the baseline). torch marks it deprecated; its warning is silenced
  here, nothing else.
- `OrtModel`: an ONNX Runtime session (CPU provider, the same number of threads as torch) behind the interface of a
  PyTorch model (float32 NCHW tensor in, logits out), so the lab's predict and timing code runs both engines alike.
- `ensure(run, model, ...)`: the run folder's `model.onnx` and `onnx.json` (exporter, torch version, size, and the
  agreement of its test-set predictions with the PyTorch model's), made once and reused. For an INT8 model it also
  stores how far the PyTorch model agrees with itself when its input moves by `NOISE_LEVELS` of one 8-bit pixel
  level (`stability`): an int8 network's prediction on some images hangs on single rounding steps (measured on the
  default store: SVD 0.125 → INT8 changes 2.3% of its test predictions under noise of 1/100 of a pixel level), and
  ONNX Runtime's integer kernels round differently from PyTorch's (fbgemm), so an INT8 file cannot agree with its
  PyTorch model much more than the model agrees with itself. The two numbers are shown side by side.

The file takes the input the PyTorch models take: float32 NCHW RGB images, pixel / 255, then (x − mean) / std with
the CIFAR-10 mean and std; they are in the file's metadata (`mean`, `std`, `classes`, `input`).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import data as data_mod
from . import models, runs

FILE, RECORD = "model.onnx", "onnx.json"
PYTORCH, ORT = "PyTorch", "ONNX Runtime"  # the two engines a model is timed in
OPSET = 17
EXPORTER = f"torch.onnx TorchScript exporter, opset {OPSET}"
INPUT, OUTPUT = "input", "logits"
NOISE_LEVELS = 0.01  # the input change of `stability`: Gaussian noise of this std, in 8-bit pixel levels


def is_quantized(model: nn.Module) -> bool:
    """Whether the model holds quantized (int8) layers."""
    return any(type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))
               for m in model.modules())


def graph_of(model: nn.Module) -> nn.Module:
    """The module exported for `model` (see the module's notes): a wrapped model's (FP16/BF16) float32 twin, else
    itself."""
    if isinstance(model, models.Wrapper):
        return copy.deepcopy(models.unwrap(model)).float().eval()
    return model.eval()


@contextlib.contextmanager
def _quiet_exporter():
    """The TorchScript exporter's deprecation notice (the choice is explained above), nothing else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # INT8's scales traced as constants, as they are
        for pattern in (r".*legacy TorchScript-based ONNX export.*", r".*The feature will be removed.*",
                        r".*torch\.ao\.quantization is deprecated.*", r".*quantized tensor creation functions.*",
                        r".*torch\.jit\.trace.* is deprecated.*"):
            warnings.filterwarnings("ignore", message=pattern)
        yield


def to_bytes(model: nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    """The ONNX file of `model` (float32 NCHW 32×32 input of any batch size), with `metadata` and the input
    convention in its metadata properties."""
    import onnx

    graph = graph_of(model)
    buf = io.BytesIO()
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(graph, (torch.zeros(2, 3, 32, 32),), buf, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    props = {"input": "float32 NCHW RGB 32x32, pixel / 255, then (x - mean) / std per channel",
             "mean": json.dumps(data_mod.MEAN), "std": json.dumps(data_mod.STD), "classes": json.dumps(data_mod.CLASSES),
             "exporter": EXPORTER, "torch": torch.__version__, **(metadata or {})}
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def to_onnx(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the ONNX file of `model` to `path` (atomically)."""
    data = to_bytes(model, metadata)
    return runs.atomic_write(path, lambda f: f.write(data))


class OrtModel(nn.Module):
    """An ONNX Runtime CPU session called like a PyTorch model: float32 NCHW tensor in, float32 logits tensor out.
    `threads` intra-op threads (default: torch's), one inter-op thread, sequential execution, all graph
    optimizations (ONNX Runtime folds BatchNorm into the convolutions and fuses the ReLUs), and ONNX Runtime's
    default spinning threads, as a deployment gets them (one image: 0.76 ms with them, 1.42 ms without, measured).

    Those threads keep spinning for tens of milliseconds after a run, and every session has its own: a PyTorch
    forward of one image timed right after took 13 ms instead of 4.9 (measured on the 2-core VM; 5.1 ms after a
    0.1 s pause), and the same dense graph timed after other sessions ranged 1.0-2.1 ms. `settle_s` is the pause
    `metrics.compare_speed` leaves after timing it."""

    settle_s = 0.1

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its warnings about unused initializers are not the user's
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for damaged or foreign files
            raise runs.RunStoreError(f"{path} cannot be opened by ONNX Runtime: {str(e).splitlines()[0]}") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(x.detach().cpu().float().numpy())  # NCHW, as the graph takes it
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: x})[0])


@dataclass
class Exported:
    """A run's ONNX file and what was checked of it."""
    path: Path
    size_kb: float
    agreement: float  # % of test images on which the ONNX model predicts the class its PyTorch model predicts
    images: int  # test images compared
    quantized: bool
    exporter: str
    reused: bool = False
    # INT8 only: % of test images on which the PyTorch model keeps its prediction under input noise of NOISE_LEVELS
    stability: float | None = None


class _Jitter(nn.Module):
    """`model` on its input plus Gaussian noise of `levels` 8-bit pixel levels (std, in each channel's normalized
    units), drawn from a fixed seed so that a check gives the same number every time."""

    def __init__(self, model: nn.Module, levels: float, seed: int = 0):
        super().__init__()
        self.model, self.generator = model, torch.Generator().manual_seed(seed)
        self.sigma = levels / (255 * torch.tensor(data_mod.STD)).view(1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + torch.randn(x.shape, generator=self.generator) * self.sigma)


def stability(model: nn.Module, test: data_mod.Split, flip: bool, reference: torch.Tensor, batch_size: int = 256,
              levels: float = NOISE_LEVELS) -> float:
    """% of test images on which `model` predicts the class of `reference` (its own predictions) when its input
    moves by Gaussian noise of `levels` 8-bit pixel levels: how much of its output single rounding steps decide."""
    jittered = predict(_Jitter(model, levels), test, batch_size, flip).argmax(1)
    return (jittered == reference.view(-1)).float().mean().item() * 100


def predict(model: nn.Module, split: data_mod.Split, batch_size: int, flip: bool) -> torch.Tensor:
    """Logits of `model` (a PyTorch model or an `OrtModel`) on every image of `split`, on the CPU, with the
    lab's evaluation protocol (`flip`: the mean of each image and its mirror)."""
    from . import train

    return train.predict(model, data_mod.Batches(split, batch_size, "cpu"), flip=flip)


def ensure(run: runs.Run, model: nn.Module, test: data_mod.Split, flip: bool, reference: torch.Tensor,
           batch_size: int = 256, name: str = "") -> Exported:
    """The ONNX file of the model of `run` in its folder, made once: exported, then run by ONNX Runtime on the
    whole test set and its predicted classes compared with `reference` (the PyTorch model's, same protocol).
    An INT8 model's `stability` is measured beside it. Reused when the folder holds a file and a record made by this
    exporter and torch version for the same test images; a damaged or incomplete record or file is made again."""
    path, record_path = run.path(FILE), run.path(RECORD)
    try:
        record = runs.read_json(record_path)
        if (isinstance(record, dict) and path.is_file() and record.get("exporter") == EXPORTER
                and record.get("torch") == torch.__version__ and record.get("images") == len(reference)
                and record.get("flip") == flip and record.get("bytes") == path.stat().st_size):
            quantized = bool(record["quantized"])
            return Exported(path, path.stat().st_size / 1e3, float(record["agreement"]), int(record["images"]),
                            quantized, EXPORTER, reused=True,
                            stability=float(record["stability"]) if quantized else None)
    except (runs.RunStoreError, KeyError, TypeError, ValueError):  # a damaged or foreign record: made again
        pass
    quantized = is_quantized(model)
    to_onnx(model, path, {"model": name, "run": str(run)})
    ort_model = OrtModel(path)
    agree = (predict(ort_model, test, batch_size, flip).argmax(1) == reference.view(-1)).float().mean().item() * 100
    steady = stability(model, test, flip, reference, batch_size) if quantized else None
    runs.write_json(record_path, {"exporter": EXPORTER, "torch": torch.__version__, "bytes": path.stat().st_size,
                                  "images": len(reference), "flip": flip, "agreement": agree, "quantized": quantized,
                                  "stability": steady, "noise_levels": NOISE_LEVELS})
    return Exported(path, path.stat().st_size / 1e3, agree, len(reference), quantized, EXPORTER, stability=steady)


def export_run(folder: str | Path, batch_size: int = 256) -> Exported:
    """`python -m resnet_lab export RUN`: the ONNX file of the finished run in `folder` (`runs/<stage>/<key>`),
    checked against its PyTorch model on the test set of the baseline it was made from (`ensure`)."""
    from . import registry

    folder = runs.resolve(folder)
    stage = folder.parent.name
    tech = registry.techniques().get(stage)
    if tech is None:
        raise runs.RunStoreError(f"{folder} is not a run folder of a technique (known: {', '.join(registry.techniques())}); "
                                 "give runs/<stage>/<key>")
    store = runs.RunStore(folder.parent.parent)
    run = runs.Run(store, stage, folder.name)
    if not run.done:
        raise runs.RunStoreError(f"{run} is not finished (no metrics.json): nothing to export")
    origin = run if stage == "baseline" else runs.Run(store, "baseline", run.params["baseline"])
    if not origin.done:
        raise runs.RunStoreError(f"the baseline {run} was made from ({origin}) is not in the store")
    bp = origin.params
    test = data_mod.from_params(bp).test
    model = tech.load(run)
    reference = predict(model, test, batch_size, bp["eval_flip"]).argmax(1)
    label = run.metrics.get("label", "baseline (FP32)") if stage != "baseline" else "baseline (FP32)"
    return ensure(run, model, test, bp["eval_flip"], reference, batch_size, label)
