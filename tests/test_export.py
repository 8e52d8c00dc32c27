"""Deployable models (resnet_lab/export.py): every kind of model as an ONNX file that ONNX Runtime runs as PyTorch
does; the run folder's file made once and checked on the test set; the CLI verb."""
import copy
import json

import onnx
import pytest
import torch

from resnet_lab import data, export, models, runs
from resnet_lab import techniques as T
from resnet_lab.__main__ import main


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = models.resnet18(8).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so that folding them is tested
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    return model


def _ort_logits(model, x, tmp_path):
    path = export.to_onnx(model, tmp_path / "m.onnx")
    return export.OrtModel(path, threads=1)(x)


def _float_models(net):
    binarized, bc = copy.deepcopy(net), models.resnet18(8).eval()
    T.binaryconnect.binarize(binarized, "inner", "deterministic", scale=True)
    bc.load_state_dict(T.binaryconnect.plain_state(binarized))
    sparse = copy.deepcopy(net)
    T.prune.unstructured(sparse, 0.8)
    return {"float": net, "unstructured 80%": T.prune.make_permanent(sparse),
            "compact structured 50%": T.prune.structured(net, 0.5)[0].eval(),
            "SVD 0.25": T.svd.svd(net, "fraction", 0.25)[0].eval(), "BinaryConnect": bc.eval()}


def test_float_models_run_in_onnx_runtime_as_in_pytorch_at_any_batch_size(net, tmp_path):
    torch.manual_seed(1)
    inputs = [torch.randn(batch, 3, 32, 32) for batch in (1, 5)]
    for name, model in _float_models(net).items():
        ort = export.OrtModel(export.to_onnx(model, tmp_path / "m.onnx"), threads=1)  # one file for every batch size
        for x in inputs:
            with torch.inference_mode():
                expected = model(x)
            got = ort(x)
            assert got.shape == expected.shape, (name, len(x))
            assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (name, len(x), (got - expected).abs().max())


def test_a_half_model_exports_as_the_float32_graph_of_its_rounded_weights(net, tmp_path):
    for dtype in (torch.float16, torch.bfloat16):
        half = T.half.half(net, dtype)
        graph = export.graph_of(half)
        w = graph.conv1.weight
        assert w.dtype == torch.float32 and torch.equal(w, net.conv1.weight.to(dtype).float())
        x = torch.randn(4, 3, 32, 32)
        with torch.inference_mode():
            expected = graph(x)
        assert torch.allclose(_ort_logits(half, x, tmp_path), expected, atol=1e-4, rtol=1e-4)


def test_an_int8_model_exports_as_a_qdq_graph_with_its_own_scales(net, tmp_path):
    torch.manual_seed(2)
    images = (torch.rand(64, 3, 32, 32) * 255).to(torch.uint8)
    q = T.int8.quantize(net, data.Batches(data.Split(images, torch.zeros(64, dtype=torch.long)), 32, "cpu"), "x86")
    assert export.is_quantized(q) and not export.is_quantized(net)
    proto = onnx.load_from_string(export.to_bytes(q))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    first = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")  # the input's quantization
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    consts |= {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"}
    assert float(consts[first.input[1]]) == pytest.approx(float(q.conv1_input_scale_0))  # the lab's own scale
    x = next(iter(data.Batches(data.Split(images, torch.zeros(64, dtype=torch.long)), 64, "cpu")))[0]
    with torch.inference_mode():
        expected = q(x)
    got = _ort_logits(q, x, tmp_path)
    # the same scales and zero points; the int8 kernels of the two engines round a few values apart
    assert (got - expected).abs().mean() < 0.05 * expected.abs().mean()


def test_stability_counts_the_predictions_that_input_noise_changes(net, tmp_path):
    torch.manual_seed(3)
    images = (torch.rand(48, 3, 32, 32) * 255).to(torch.uint8)
    test = data.Split(images, torch.zeros(48, dtype=torch.long))
    reference = export.predict(net, test, 16, False).argmax(1)
    assert export.stability(net, test, False, reference, 16, levels=0.0) == 100.0
    assert export.stability(net, test, False, reference, 16, levels=1e-3) == 100.0  # a float net: no rounding step
    x = torch.zeros(64, 3, 32, 32)
    noise = export._Jitter(torch.nn.Identity(), 2.0)(x)  # the noise: 2 pixel levels in each channel's units
    for c in range(3):
        assert noise[:, c].std().item() == pytest.approx(2.0 / (255 * data.STD[c]), rel=0.02)
    assert torch.equal(noise, export._Jitter(torch.nn.Identity(), 2.0)(x))  # a fixed seed: repeatable
    q = T.int8.quantize(net, data.Batches(test, 16, "cpu"), "x86")
    store = runs.RunStore(tmp_path / "runs")
    run = store.run("int8", {"x": 1})
    q_reference = export.predict(q, test, 16, False).argmax(1)
    e = export.ensure(run, q, test, False, q_reference, 16, "int8")
    record = json.loads(run.path(export.RECORD).read_text())
    assert e.quantized and 0 <= e.stability <= 100 and record["stability"] == e.stability
    assert record["noise_levels"] == export.NOISE_LEVELS
    assert export.ensure(run, q, test, False, q_reference, 16, "int8").stability == e.stability
    run.path(export.RECORD).write_text(json.dumps({k: v for k, v in record.items() if k != "stability"}))
    assert not export.ensure(run, q, test, False, q_reference, 16, "int8").reused  # a record from before: made again


def test_the_file_says_what_input_it_takes(net):
    meta = {p.key: p.value for p in onnx.load_from_string(export.to_bytes(net, {"model": "x"})).metadata_props}
    assert json.loads(meta["mean"]) == list(data.MEAN) and json.loads(meta["std"]) == list(data.STD)
    assert json.loads(meta["classes"]) == list(data.CLASSES) and meta["model"] == "x" and "NCHW" in meta["input"]


def test_a_damaged_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(runs.RunStoreError, match="cannot be opened by ONNX Runtime"):
        export.OrtModel(tmp_path / "bad.onnx")


def test_a_run_folder_gets_its_file_once_and_a_damaged_record_remakes_it(net, tmp_path):
    store = runs.RunStore(tmp_path / "runs")
    run = store.run("baseline", {"x": 1})
    test = data.Split((torch.rand(40, 3, 32, 32) * 255).to(torch.uint8), torch.zeros(40, dtype=torch.long))
    reference = export.predict(net, test, 16, True).argmax(1)
    first = export.ensure(run, net, test, True, reference, 16, "net")
    assert not first.reused and first.agreement == 100.0 and first.images == 40 and first.path == run.path(export.FILE)
    stamp = first.path.stat().st_mtime_ns
    again = export.ensure(run, net, test, True, reference, 16, "net")
    assert again.reused and again.agreement == 100.0 and first.path.stat().st_mtime_ns == stamp
    run.path(export.RECORD).write_text("{ damaged")
    remade = export.ensure(run, net, test, True, reference, 16, "net")
    assert not remade.reused and json.loads(run.path(export.RECORD).read_text())["agreement"] == 100.0
    record = json.loads(run.path(export.RECORD).read_text())
    run.path(export.RECORD).write_text(json.dumps({**record, "agreement": "all of them"}))  # parseable, wrong type
    assert not export.ensure(run, net, test, True, reference, 16, "net").reused
    wrong = reference.clone()
    wrong[:4] = (wrong[:4] + 1) % 10  # a reference the file does not reproduce on 4 of 40 images
    run.path(export.RECORD).unlink()
    assert export.ensure(run, net, test, True, wrong, 16, "net").agreement == pytest.approx(90.0)


def test_the_cli_exports_a_run_folder_and_refuses_what_is_not_one(tmp_path, capsys):
    # the command line's `export` verb, in this process (test_summary runs `python -m resnet_lab export` on a run)
    assert main(["export", str(tmp_path / "runs" / "nothing" / "abc")]) == 2
    assert "not a run folder of a technique" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "runs" / "int8" / "abc")]) == 2
    assert "not finished" in capsys.readouterr().err
