import math

import pytest
import torch

from resnet_lab import baselines, data, models, params, runs, train
from resnet_lab import techniques as T
from resnet_lab.train import TrainingDiverged


# What a test of the training loop alone needs: a few steps an epoch, not the smoke profile's 512 images.
SMALL = {"synthetic_train": 128, "synthetic_test": 32}


def _fit(p, checkpoint=None):
    torch.manual_seed(p["seed"])
    model = models.resnet18(p["width"])
    return model, train.fit(model, data.from_params(p), p, checkpoint)


@pytest.mark.parametrize("optimizer, scheduler", [("sgd", "step"), ("adam", "cosine"), ("adamw", "none")])
def test_every_optimizer_and_schedule_runs(smoke, optimizer, scheduler):
    p = dict(smoke, **SMALL, epochs=2, optimizer=optimizer, scheduler=scheduler, lr=1e-3, step_size=1, gamma=0.5,
             label_smoothing=0.1, test_each_epoch=False)
    _, history = _fit(p)
    assert "test_acc" not in history[0] and "val_acc" in history[0]
    if scheduler == "step":
        assert history[1]["lr"] == pytest.approx(history[0]["lr"] * 0.5)


def test_nan_loss_stops_with_a_clear_message(smoke):
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        _fit(dict(smoke, **SMALL, lr=1e6, scheduler="none", epochs=2))


def test_resume_after_interruption_gives_the_same_history(smoke, tmp_path, monkeypatch):
    p = dict(smoke, **SMALL, epochs=3)
    _, uninterrupted = _fit(p)

    checkpoint = tmp_path / "checkpoint.pt"
    real_save, saves = runs.save_torch, []

    def save_then_die(path, obj):
        real_save(path, obj)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed right after epoch 2's checkpoint

    monkeypatch.setattr(runs, "save_torch", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _fit(p, checkpoint)
    monkeypatch.setattr(runs, "save_torch", real_save)
    _, resumed = _fit(p, checkpoint)
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in h]  # noqa: E731
    assert strip(resumed) == strip(uninterrupted)


def test_the_baseline_learns_the_synthetic_task_stores_its_run_and_then_reuses_it(smoke_replicates):
    # the smoke baseline of each seed as conftest's `smoke_replicates` trained it (once per test run) into a new store
    smoke, (first, _) = smoke_replicates
    assert not first.reused and first.run.done
    history = first.history  # the training of the stage, read back from its history.json
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_acc"] > 50 and history[-1]["test_acc"] > 50  # 10 classes: chance is 10%
    for key in ("lr", "train_acc", "val_loss", "test_loss", "epoch_time_s"):
        assert all(math.isfinite(r[key]) for r in history)
    names = {f.name for f in first.run.dir.iterdir()}
    assert {"params.yaml", "model.pt", "history.json", "predictions.npz", "metrics.json"} <= names
    assert "checkpoint.pt" not in names and not any(n.endswith(".tmp") for n in names)
    m = first.metrics
    assert m["params"] == sum(p.numel() for p in first.model.parameters())
    assert m["size_bytes"] > 4 * m["params"] and m["throughput_img_s"] > 0
    assert len(first.test_predictions) == len(first.dataset.test)
    second = baselines.train(smoke)
    assert second.reused and second.run.dir == first.run.dir
    assert second.metrics == m
    x = torch.randn(2, 3, 32, 32)
    first.model.eval(), second.model.eval()
    assert torch.equal(first.model(x), second.model(x))


def test_baseline_seeds_train_one_run_per_seed_on_the_same_split(smoke_replicates, baseline_store):
    assert [r.reused for r in smoke_replicates[1]] == [False, False]  # conftest's `smoke_replicates` trained both
    smoke = {**smoke_replicates[0], "run_root": str(baseline_store)}  # a copy of its store
    assert smoke["seeds"] == [0, 1]  # the smoke file's
    alone = baselines.train({**smoke, "seeds": []})
    reps = baselines.replicates(smoke)
    assert [r.run.params.get("train_seed") for r in reps] == [None, 1]
    assert reps[0].run.dir == alone.run.dir and reps[0].reused  # the run of `seed` keeps its key
    assert {r.run.params["seed"] for r in reps} == {0}  # the split's seed; the training seed is its own key
    assert reps[0].run.key != reps[1].run.key
    w0, w1 = (next(iter(r.model.state_dict().values())) for r in reps)
    assert not torch.equal(w0, w1)  # another initialisation
    assert torch.equal(reps[0].dataset.val.labels, reps[1].dataset.val.labels)  # the same held-out images
    assert all(r.reused for r in baselines.replicates(smoke))
    found = baselines.replicate_runs(str(runs.PROJECT_ROOT / "params" / "smoke.yaml"), smoke)
    assert {s: r.dir for s, r in found.items()} == {s: r.run.dir for s, r in zip((0, 1), reps)}
    looked_up, bp = baselines.trained(str(runs.PROJECT_ROOT / "params" / "smoke.yaml"), smoke, 1)
    assert looked_up.run.dir == reps[1].run.dir and bp["seed"] == 1


def test_a_stage_asking_for_a_baseline_seed_the_baseline_does_not_have_is_refused(smoke):
    with pytest.raises(params.ParamsError, match="not one of the training seeds"):
        baselines.trained(str(runs.PROJECT_ROOT / "params" / "smoke.yaml"), smoke, 7)


def test_models_with_a_narrow_strided_1x1_conv_train_in_nchw_on_the_cpu():
    """oneDNN's NHWC weight gradient of a strided 1x1 conv with fewer input channels than its SIMD block hangs,
    corrupts the heap or is wrong on AVX2 CPUs (oneDNN #6035): such models train in NCHW; the default width keeps
    NHWC. (On an AVX2 CPU, `make bench`'s width-4 test hung in its third step before this.)"""
    cpu = torch.device("cpu")
    assert train.train_channels_last(cpu, models.resnet18(16))
    assert not train.train_channels_last(cpu, models.resnet18(4)) and not train.train_channels_last(cpu, models.resnet18(8))
    narrow = T.prune.remove_channels(models.resnet18(16), {"conv1": list(range(8))})  # stage 1's stream down to 8
    assert narrow.layer2[0].shortcut[0].in_channels == 8 and not train.train_channels_last(cpu, narrow)
    model = models.resnet18(4)
    p = params.validate({"data": "synthetic", "synthetic_train": 64, "synthetic_test": 32, "width": 4, "epochs": 1,
                         "batch_size": 16, "progress": False}, "baseline")
    history = train.fit(model, data.from_params(p), p)
    assert math.isfinite(history[0]["train_loss"])
