import json
import os
import subprocess

import nbformat
import pytest
import yaml

from resnet_lab import params
from resnet_lab import techniques as T
from resnet_lab.__main__ import main
from resnet_lab.params import ParamsError

from conftest import PARAMS, ROOT

STAGE_OF = {"bench.yaml": "bench", "optuna.yaml": "optuna", "optuna_full.yaml": "optuna", "optuna_smoke.yaml": "optuna",
            **{f: "quantization" for f in ("quantization.yaml", "quantization_smoke.yaml", "quantization_full.yaml",
                                            "fp16.yaml", "int8.yaml", "bc.yaml", "quantization_seeds.yaml", "qat.yaml")},
            **{f: "svd" for f in ("svd.yaml", "svd_energy.yaml", "svd_smoke.yaml", "svd_full.yaml", "svd_scratch.yaml", "svd_seeds.yaml")},
            **{f: "pruning" for f in ("pruning.yaml", "pruning_smoke.yaml", "pruning_full.yaml", "l1.yaml", "l1_global.yaml",
                                      "ln_structured.yaml", "prune_fp16.yaml", "prune_bc.yaml", "l1_sensitivity.yaml", "pruning_seeds.yaml",
                                      "prune_qat.yaml")},
            **{f: "summary" for f in ("summary.yaml", "summary_smoke.yaml", "summary_full.yaml", "summary_seeds.yaml")}}


@pytest.mark.parametrize("path", sorted(p.name for p in PARAMS.glob("*.yaml") if p.name != "report.yaml"))
def test_every_params_file_validates(path):
    # validation alone: the full profile's files ask for a GPU, which the probe after it checks on the machine
    p = params.validate(params.read_yaml(PARAMS / path), STAGE_OF.get(path, "baseline"))
    assert set(p) == set(params.SCHEMAS[STAGE_OF.get(path, "baseline")])


@pytest.mark.parametrize("path", sorted(p.name for p in PARAMS.glob("*.yaml") if p.name != "report.yaml"))
def test_the_stage_of_every_shipped_params_file_is_inferred(path):
    # Before: `check` without --stage checked every file as a baseline file and refused 26 of 29 without saying
    # why (issue 17, item 7).
    assert params.infer_stage(PARAMS / path) == STAGE_OF.get(path, "baseline")


def test_misspelled_key_is_named_with_suggestion_and_allowed_keys():
    with pytest.raises(ParamsError) as e:
        params.validate({"epochz": 3}, "baseline")
    msg = str(e.value)
    assert "'epochz'" in msg and "did you mean 'epochs'" in msg and "batch_size" in msg


@pytest.mark.parametrize("key, value, expect", [
    ("epochs", 0, "out of range"),
    ("epochs", 2.5, "has type float"),
    ("epochs", True, "has type bool"),
    ("lr", 0.0, "out of range"),
    ("lr", float("nan"), "out of range"),
    ("val_fraction", 0.9, "out of range"),
    ("optimizer", "sgdd", "one of 'sgd', 'adam', 'adamw'"),
    ("data", "imagenet", "one of 'mini'"),
    ("nesterov", "yes", "has type str"),
])
def test_bad_values_are_refused_naming_key_and_allowed_values(key, value, expect):
    with pytest.raises(ParamsError) as e:
        params.validate({key: value}, "baseline")
    assert f"'{key}'" in str(e.value) and expect in str(e.value)


def test_int_is_accepted_for_float_and_defaults_fill_in():
    p = params.validate({"lr": 1}, "baseline")
    assert p["lr"] == 1.0 and isinstance(p["lr"], float)
    assert p["epochs"] == params.SCHEMAS["baseline"]["epochs"].default


def test_a_number_written_the_usual_way_is_a_number(tmp_path):
    # Before: YAML 1.1 reads `1e-3` (no dot) as a string and `lr: 1e-3` was refused with "has type str"
    # (issue 17, item 5), while `papermill -p lr 1e-3` worked.
    f = tmp_path / "p.yaml"
    f.write_text("lr: 1e-3\nweight_decay: 5E-4\nlabel_smoothing: .1\n"
                 "search_space:\n  lr: {sgd: [1e-3, 1e-1]}\n")
    p = params.load(f, "optuna")
    assert (p["lr"], p["weight_decay"], p["label_smoothing"]) == (0.001, 0.0005, 0.1)
    assert p["search_space"]["lr"]["sgd"] == [0.001, 0.1]
    assert params.from_notebook({"lr": "1e-3"}, "baseline")["lr"] == 0.001  # papermill -f injects the string
    for text in ("fast", "1e-3x", "nan", "inf", "0x10", ""):
        with pytest.raises(ParamsError, match="'lr'"):
            params.validate({"lr": text}, "baseline")
    with pytest.raises(ParamsError, match="out of range"):
        params.validate({"lr": "-1e-3"}, "baseline")


def test_the_readme_chain_examples_validate():
    text = (ROOT / "README.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    doc = yaml.safe_load(block)
    variants = params.validate({"variants": doc["variants"]}, "pruning")["variants"]
    assert variants[0]["lr"] == 0.001  # written 1e-3 in the README
    params.validate({"start": doc["start"]}, "quantization")


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="must hold a mapping"):
        params.load(f, "baseline")
    f.write_text("epochs: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        params.load(f, "baseline")


def test_from_notebook_catches_papermill_injected_unknown_key():
    namespace = {"In": [], "Out": {}, "epochs": 3, "lerning_rate": 0.1, "_hidden": 1, "get_ipython": print}
    with pytest.raises(ParamsError, match="'lerning_rate'"):
        params.from_notebook(namespace, "baseline")
    assert params.from_notebook({"epochs": 3, "In": []}, "baseline")["epochs"] == 3


@pytest.mark.parametrize("notebook, params_file, stage", [("01_baseline", "baseline.yaml", "baseline"),
                                                         ("02_optuna", "optuna.yaml", "optuna"),
                                                         ("03_quantization", "quantization.yaml", "quantization"),
                                                         ("04_pruning", "pruning.yaml", "pruning"),
                                                         ("05_svd", "svd.yaml", "svd"),
                                                         ("06_summary", "summary.yaml", "summary"),
                                                         (None, "bench.yaml", "bench")])
def test_every_default_is_declared_once_and_the_notebooks_and_default_files_mean_the_same(notebook, params_file, stage):
    """A default lives in the stage's declaration only: the default profile's params file changes nothing, and a
    notebook's parameters cell lists every key (papermill warns of none) with the declared default's meaning."""
    declared = params.validate({}, stage)
    assert params.read_yaml(PARAMS / params_file) == {}  # nothing but comments: no second copy that can disagree
    assert params.load(PARAMS / params_file, stage) == declared
    if notebook is None:
        return
    nb = nbformat.read(ROOT / "notebooks" / f"{notebook}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    namespace = {}
    exec(cell.source, namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(params.SCHEMAS[stage])  # every knob visible, papermill warns of none
    assert params.validate(namespace, stage) == declared


def test_identity_ignores_presentation_keys_only():
    a = params.validate({}, "baseline")
    b = dict(a, run_root="/elsewhere", progress=False, reuse=False)
    assert params.identity(a) == params.identity(b)
    assert params.identity(a) != params.identity(dict(a, epochs=a["epochs"] + 1))


def test_cli_check_fails_fast_naming_the_key(tmp_path, python, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((PARAMS / "smoke.yaml").read_text() + "batchsize: 64\n")
    r = subprocess.run([python, "-m", "resnet_lab", "check", str(bad)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert "unknown parameter 'batchsize' (did you mean 'batch_size'?)" in r.stderr
    assert "[checked for stage 'baseline' (inferred from its keys" in r.stderr
    capsys.readouterr()  # the files it accepts: the same command in this process
    assert main(["check", str(PARAMS / "smoke.yaml")]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["data"] == "synthetic"
    assert main(["check", str(PARAMS / "pruning.yaml")]) == 0
    assert "valid for stage 'pruning' (inferred" in capsys.readouterr().out


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "epochs: *i\n"


@pytest.mark.parametrize("content, message", [
    (BOMB.encode(), "aliases (*name) are not accepted"),
    (b"epochs: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8 text"),
    (b"lr: 0.1\n#" + b"x" * 1_100_000 + b"\n", "larger than 1,000,000 bytes"),
    (b"seed: 123456789012345678901234567890\n", "parameter 'seed'"),
    (b"epochs: '" + b"x" * 100_000 + b"'\n", "parameter 'epochs'"),
    # Before: the last of two keys won silently (params/quantization_full.yaml lost its `device: cuda` that way)
    (b"device: cpu\nepochs: 2\ndevice: auto\n", "key 'device' appears twice"),
])
def test_hostile_params_files_are_refused_up_front_in_one_bounded_line(tmp_path, capsys, content, message):
    # Before: the alias bomb expanded without bound, deep nesting ended in RecursionError, a binary file in
    # UnicodeDecodeError, a huge seed failed in torch after the run folder existed (issue 17, item 4).
    f = tmp_path / "hostile.yaml"
    f.write_bytes(f"run_root: {tmp_path / 'runs'}\n".encode() + content)
    with pytest.raises(ParamsError) as refused:
        params.load(f, "baseline")
    assert message in str(refused.value) and len(str(refused.value)) < 1000
    capsys.readouterr()
    assert main(["train", str(f)]) == 2  # the command line's answer (its own process: test_cli_check_fails_fast_…)
    err = capsys.readouterr().err
    assert message in err and len(err) < 1500 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("stage, content, message", [
    ("baseline", "measure_batch_size: 1000000000\n", "parameter 'measure_batch_size' = 1,000,000,000 cannot fit"),
    ("baseline", "data: synthetic\nsynthetic_train: 9000000\n", "parameter 'synthetic_train' = 9,000,000 cannot fit"),
    ("baseline", "width: 1024\nbatch_size: 65536\n", "parameter 'batch_size' = 65,536 cannot fit"),
    ("baseline", "synthetic_test: 100000000000\n", "parameter 'synthetic_test' = 100000000000 is out of range"),
    ("summary", "latency_batch_size: 1000000000\n", "parameter 'latency_batch_size' = 1,000,000,000 cannot fit"),
    ("quantization", "eval_batch_size: 1000000000\nbaseline: params/full.yaml\n", None),  # capped by the split
])
def test_sizes_whose_allocation_cannot_succeed_are_refused_before_any_work(tmp_path, stage, content, message):
    # Before: a huge measure_batch_size failed in torch.randn after the whole training, synthetic sizes in numpy's
    # allocator, a huge batch after the run folder existed (issue 17, item 4). The need counted is a lower bound,
    # so a size that a split caps (evaluation batches larger than any split) is accepted.
    f = tmp_path / "sizes.yaml"
    f.write_text(f"run_root: {tmp_path / 'runs'}\n{content}")
    if message is None:
        assert params.load(f, stage)
        return
    with pytest.raises(ParamsError) as refused:
        params.load(f, stage)
    assert str(refused.value).startswith(message) and "GiB" in str(refused.value) or "out of range" in message
    assert len(str(refused.value)) < 400


def test_the_memory_a_model_keeps_per_image_is_counted_from_its_real_forward_pass():
    # the meta-device count (nothing allocated) equals the outputs of every leaf module of a real forward pass
    import torch

    from resnet_lab import models, resources

    sizes = []
    model = models.resnet18(8)
    for m in model.modules():
        if not list(m.children()):
            m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel()))
    model(torch.zeros(1, 3, 32, 32))
    assert resources.activation_floats(8) == (sum(sizes), max(sizes)) == (sum(sizes), 8 * 32 * 32)
    assert 0 < resources.memory_bytes()


def test_a_training_batch_that_leaves_one_step_per_epoch_is_refused_with_its_reason(tmp_path, python):
    # Before: OneCycleLR divided by zero in the first epoch, after the run folder existed (issue 17, item 4)
    f = tmp_path / "one_step.yaml"
    f.write_text((PARAMS / "smoke.yaml").read_text().replace("batch_size: 32\n", "batch_size: 65536\n")
                 + f"run_root: {tmp_path / 'runs'}\n")
    r = subprocess.run([python, "-m", "resnet_lab", "train", str(f)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "scheduler 'onecycle' cannot warm up over exactly one step" in r.stderr and "change batch_size" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_a_params_file_that_is_a_symlink_to_an_endless_file_is_refused(tmp_path):
    (tmp_path / "p.yaml").symlink_to("/dev/zero")
    with pytest.raises(ParamsError, match="larger than"):
        params.load(tmp_path / "p.yaml", "baseline")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks_is_refused_before_any_work(tmp_path):
    # validation is pure (a params file means the same on every machine); the probe after it looks at this one
    p = params.validate({"device": "cuda"}, "baseline")
    with pytest.raises(ParamsError, match="parameter 'device' = 'cuda', but this machine has no CUDA GPU"):
        params.probe(p)
    f = tmp_path / "gpu.yaml"
    f.write_text("device: cuda\n")
    with pytest.raises(ParamsError, match="no CUDA GPU"):
        params.load(f, "baseline")  # what the notebooks and the command line call: validation, then the probe
    assert params.probe(params.validate({"device": "cpu"}, "baseline"))["device"] == "cpu"
