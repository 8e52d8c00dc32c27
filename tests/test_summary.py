"""06_summary's aggregation: every run read back and measured again; damaged runs listed; fronts and best picks."""
import json
import shutil
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from resnet_lab import baselines, export, params, results, runs, stats, summary
from resnet_lab.__main__ import main
from resnet_lab.stages import factorization, pruning, quantization

from conftest import PARAMS, smoke_baseline
from conftest import stage_params as _stage_params


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A smoke baseline and one run of each kind of model, made by the stages themselves."""
    root = tmp_path_factory.mktemp("store") / "runs"
    smoke_baseline(root)
    quantization.run(_stage_params("quantization_smoke.yaml", "quantization", root, methods=["fp16", "int8"]))
    pruning.run(_stage_params("pruning_smoke.yaml", "pruning", root, epochs=1, sensitivity_amounts=[], curve_amounts=[],
                              variants=[{"method": "l1", "scope": "global"},
                                        {"method": "ln_structured", "scope": "layer",
                                         "then": [{"int8": {"calibration_images": 128}}]}]))
    factorization.run(_stage_params("svd_smoke.yaml", "svd", root, ranks=[0.5], variants=[], then=[], scratch_ranks=[], epochs=1))
    return root


@pytest.fixture(scope="module")
def summarized(store):
    """The summary of `store`, made once for the tests that read it: (the summary, every file of the store with its
    modification time before it, and after it)."""
    def files():
        return {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}

    before = files()
    s = _summarize(store)
    return s, before, files()


def _summarize(root, **changes):
    p = params.load(PARAMS / "summary_smoke.yaml", "summary")
    p.update(run_root=str(root), progress=False, **changes)
    return summary.run(params.validate(p, "summary"))


def test_every_model_is_rebuilt_and_measured_again_matching_what_its_stage_stored(store, summarized):
    s = summarized[0]
    df = summary.table(s)
    assert list(df["group"]) == ["baseline", "quantization", "quantization", "pruning", "pruning", "factorization",
                                 "combination"]
    assert list(df["technique"]) == ["baseline", "fp16", "int8", "prune", "prune", "svd", "int8"]
    assert df.index[0] == "baseline (FP32, width 8)" and df.iloc[0][summary.DELTA] == 0
    chain = "L1 structured, layer, 50% of channels → INT8 (x86, 128 calibration images)"
    assert df.loc[chain, "parent"] == "L1 structured, layer, 50% of channels" and df.loc[chain, "links"] == 2
    # a chain below pruning is scored against the unpruned baseline, like the pruned model itself
    assert df.loc[chain, "course score"] < df.loc["L1 structured, layer, 50% of channels", "course score"] / 3
    assert list(df["recipe"])[1:3] == ["converted, no training"] * 2 and df.loc[chain, "recipe"] == "converted, no training"
    assert df.loc["L1 structured, layer, 50% of channels", "recipe"].startswith("1 epoch, ")
    assert [e["notebook"] for e in s.runs if e["model"] == chain] == ["04_pruning"]  # made by 04's chain, not by 03
    for column in ("recipe", summary.ACC, summary.DELTA, "parameters", "nonzero parameters", summary.MACS, summary.SIZE,
                   s.latency_col, s.throughput_col, "course score", "MicroNet score"):
        assert df[column].notna().all(), column
    assert (df[s.latency_col] > 0).all() and (df[s.throughput_col] > 0).all()
    # every accuracy with its Wilson interval, every model paired image by image with the baseline
    assert df[summary.VERDICT].iloc[0] == "reference"
    assert set(df[summary.VERDICT].iloc[1:]) <= {stats.BETTER, stats.WORSE, stats.SAME}
    for name, row in df.iterrows():
        lo, hi = map(float, row[summary.ACC_CI].split("–"))
        assert lo - 0.05 <= row[summary.ACC] <= hi + 0.05, name
        right = s.correct[name]
        assert 100 * right.mean() == pytest.approx(row[summary.ACC], abs=1e-4)
    assert ((df[summary.P_BASELINE].iloc[1:] >= 0) & (df[summary.P_BASELINE].iloc[1:] <= 1)).all()
    for row in s.rows:
        run = runs.Run(runs.RunStore(store), row["stage"], row["run"].rsplit("/", 1)[1])
        stored = run.metrics
        assert row[summary.ACC] == pytest.approx(stored["test_acc"], abs=1e-6), row["model"]  # the saved file reproduces it
        assert row[summary.SIZE] * 1e3 == run.path(stored.get("artifact", "model.pt")).stat().st_size
        if row["stage"] != "baseline":
            assert row["stage"] == stored["technique"] and stored["reload_exact"], row["model"]
        if "score" in stored:  # the stages and the summary score a model by one rule
            assert row["course score"] == pytest.approx(stored["score"], rel=1e-9), row["model"]
        if "micronet_score" in stored:
            assert row["MicroNet score"] == pytest.approx(stored["micronet_score"], rel=1e-9), row["model"]
        for key, column in (("params", "parameters"), ("nonzero_params", "nonzero parameters"), ("macs", summary.MACS)):
            if key in stored:
                assert row[column] == stored[key], (row["model"], key)
    sparse = df.loc["L1 unstructured, global, 50%"]
    assert sparse["nonzero parameters"] < 0.6 * sparse["parameters"] and sparse[summary.SIZE] < df.iloc[0][summary.SIZE]
    assert df.loc["L1 structured, layer, 50% of channels", summary.MACS] < 0.5 * df.iloc[0][summary.MACS]
    assert not summary.mismatches(s) and not summary.unusable(s)
    # every model as an ONNX file in its run folder, agreeing with its PyTorch model, timed in both engines
    p = params.load(PARAMS / "summary_smoke.yaml", "summary")
    assert set(s.onnx) == set(df.index) and not s.onnx_errors
    assert {e.quantized for name, e in s.onnx.items()} == {True, False}
    folders = {row["model"]: row["run"] for row in s.rows}
    assert all(str(e.path.parent) == folders[name] for name, e in s.onnx.items())
    assert (df[s.ort_latency_col] > 0).all() and (df[s.ort_throughput_col] > 0).all()
    quantized = [name for name, e in s.onnx.items() if e.quantized]
    assert df.drop(index=quantized)[summary.AGREEMENT].min() >= p["onnx_agreement"]  # float graphs: the same model
    # int8: the same scales, but two engines' int8 kernels; on 128 images of a 1-epoch width-8 model, nearly tied
    # logits flip a few predictions (the default profile's models: 97.4-98.8%, see the README)
    assert df.loc[quantized, summary.AGREEMENT].min() >= 90
    ot = summary.onnx_table(s, p)
    low = [name for name in quantized if df.loc[name, summary.AGREEMENT] < p["onnx_agreement_quantized"]]
    assert list(ot.index) == list(df.index) and [n for n in ot.index if ot.loc[n, "check"] != "ok"] == low
    assert [line.split(":")[0] for line in summary.flagged(s, p)] == [n.split(":")[0] for n in low]
    assert "ONNX Runtime" in summary.engines(s, df, 2.0) and "CPU latency, ONNX Runtime" in summary.criteria(s)
    in_table = [e for e in s.runs if e["status"] == summary.IN_TABLE]
    assert sorted(e["model"] for e in in_table) == sorted(df.index)
    others = [e for e in s.runs if e["status"] != summary.IN_TABLE]  # the pruning curves: analyses, listed
    assert others and all(e["stage"] == "prune_analysis" and e["status"].startswith("analysis") for e in others)


def test_damaged_unfinished_and_foreign_runs_are_listed_not_dropped(store, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(store, root)
    st = runs.RunStore(root)
    fp16 = st.runs("fp16")[0]
    [int8] = [r for r in st.runs("int8") if r.metrics["links"] == 1]
    [svd] = st.runs("svd")
    fp16.path("metrics.json").write_text("{ not json")                      # corrupt metrics
    int8.path("metrics.json").unlink()                                     # interrupted before it finished
    svd.path("packed.pt").write_bytes(svd.path("packed.pt").read_bytes()[:100])  # damaged weights
    [structured] = [r for r in st.runs("prune") if r.metrics["method"] == "ln_structured"]
    m = structured.metrics
    structured.write_json("metrics.json", {**m, "test_acc": m["test_acc"] + 5})  # a stored figure its model does not give
    # a run made from a baseline that is gone, and a baseline trained on other data
    [base] = st.runs("baseline")
    orphan = root / "prune" / "0rphan000000"
    shutil.copytree(st.runs("prune")[0].dir, orphan)
    p = yaml.safe_load((orphan / "params.yaml").read_text())
    (orphan / "params.yaml").write_text(yaml.safe_dump({**p, "baseline": "gone00000000"}))
    other = root / "baseline" / "0ther0000000"
    shutil.copytree(base.dir, other)
    bp = yaml.safe_load((other / "params.yaml").read_text())
    (other / "params.yaml").write_text(yaml.safe_dump({**bp, "seed": bp["seed"] + 1}))  # other synthetic images
    (root / "mystery" / "abc").mkdir(parents=True)

    s = _summarize(root)
    status = {e["run"].split("runs/", 1)[1]: e["status"] for e in s.runs}
    assert status[f"fp16/{fp16.key}"].startswith("unusable") and "not valid JSON" in status[f"fp16/{fp16.key}"]
    assert status[f"int8/{int8.key}"].startswith("unfinished")
    assert status[f"svd/{svd.key}"].startswith("unusable") and "packed.pt" in status[f"svd/{svd.key}"]
    assert status["prune/0rphan000000"].startswith("unusable") and "gone00000000" in status["prune/0rphan000000"]
    assert status["baseline/0ther0000000"].startswith("not compared: made on other data")
    assert status["mystery/abc"].startswith("not read")
    assert len(summary.unusable(s)) == 5
    [wrong] = summary.mismatches(s)
    assert wrong.startswith("L1 structured, layer, 50% of channels: stored")
    df = summary.table(s)  # the usable models are all still there
    assert set(df.index) == {"baseline (FP32, width 8)", "L1 unstructured, global, 50%", "L1 structured, layer, 50% of channels",
                             "L1 structured, layer, 50% of channels → INT8 (x86, 128 calibration images)"}
    assert "unusable runs listed" in summary.headline(s, df, 2.0)


def _frame():
    """Hand-made models: the baseline first; costs and accuracies chosen so the fronts are known."""
    rows = {"base": ("baseline", 73.0, 1000, 100, 2.0, 500, 0.25),
            "q_small": ("quantization", 73.2, 250, 100, 1.5, 900, 0.06),
            "q_slow": ("quantization", 73.0, 500, 100, 8.0, 60, 0.12),
            "p_fast": ("pruning", 72.0, 600, 40, 1.0, 1000, 0.05),
            "p_bad": ("pruning", 60.0, 100, 40, 1.0, 1000, 0.04),
            "s_mid": ("factorization", 72.5, 400, 60, 2.5, 700, 0.10),
            "s_tie": ("factorization", 72.5, 400, 60, 2.5, 700, 0.10)}
    df = pd.DataFrame.from_dict(rows, orient="index", columns=["group", summary.ACC, summary.SIZE, summary.MACS, "lat",
                                                                "thr", "course score"])
    df[summary.DELTA] = df[summary.ACC] - 73.0
    df[summary.VERDICT] = ["reference"] + [stats.SAME] * 3 + [stats.WORSE] + [stats.SAME] * 2
    df["MicroNet score"] = df["course score"]
    return SimpleNamespace(latency_col="lat", throughput_col="thr"), df


def test_pareto_fronts_keep_exactly_the_models_nothing_beats():
    s, df = _frame()
    assert set(df.index[summary.pareto(df, summary.SIZE)]) == {"q_small", "p_bad"}
    assert set(df.index[summary.pareto(df, summary.MACS)]) == {"p_fast", "s_mid", "s_tie", "q_small"}  # equal ones both stay
    assert set(df.index[summary.pareto(df, "lat")]) == {"q_small", "p_fast"}  # p_bad: as fast, less accurate
    assert set(df.index[summary.pareto(df, "thr", higher_is_better=True)]) == {"q_small", "p_fast"}
    front = summary.pareto(df, "course score")
    assert front["p_bad"] and front["q_small"] and not front["base"] and not front["s_tie"]


def test_best_per_criterion_over_all_and_within_the_allowed_drop():
    s, df = _frame()
    b = summary.best(s, df, max_drop=2.0)
    within = "≤ 2 pt below the baseline, not worse"
    assert b.loc["size on disk (KB)", ("any accuracy", "model")] == "p_bad"
    assert b.loc["size on disk (KB)", ("any accuracy", summary.VERDICT)] == stats.WORSE
    assert b.loc["size on disk (KB)", (within, "model")] == "q_small"
    assert b.loc["course score", (within, "model")] == "p_fast"
    assert b.loc["CPU latency, PyTorch", (within, "model")] == "p_fast" and b.loc["CPU throughput, PyTorch", (within, "value")] == 1000
    # q_small has the highest accuracy (+0.2 pt), but nothing says it is better: the baseline stays the most accurate
    assert b.loc["test accuracy (%)", ("any accuracy", "model")] == "base"
    assert "no model is detectably more accurate" in summary.most_accurate(df) and "q_small" in summary.most_accurate(df)
    df.loc["q_small", summary.VERDICT] = stats.BETTER
    assert summary.best(s, df, max_drop=2.0).loc["test accuracy (%)", ("any accuracy", "model")] == "q_small"
    # the words say which verdict a claim rests on
    df[summary.BASIS] = [None] + ["recipe over 2 seeds"] * 3 + ["these test images"] * 3
    assert "(+0.20 pt, better, recipe over 2 seeds)" in summary.most_accurate(df)
    assert summary.best(s, df, 2.0).loc["size on disk (KB)", ("any accuracy", summary.BASIS)] == "these test images"


def test_a_model_found_worse_does_not_compete_on_cost_even_within_the_allowed_drop():
    s, df = _frame()
    df.loc["p_fast", summary.VERDICT] = stats.WORSE  # -1.0 pt, within 2, but the statistics call it worse
    assert "p_fast" not in summary.competing(df, 2.0).index
    assert summary.best(s, df, max_drop=2.0).loc["CPU latency, PyTorch", ("≤ 2 pt below the baseline, not worse", "model")] == "q_small"


def test_each_group_is_checked_for_a_model_that_beats_the_baseline():
    s, df = _frame()
    beats = summary.beats_baseline(s, df)
    assert beats.loc["quantization", "smaller"] == 2 and beats.loc["quantization", "lower latency"] == 1
    assert beats.loc["quantization", "smallest"] == f"q_small: 250 KB (4.00× smaller, +0.20 pt, {stats.SAME})"
    assert beats.loc["pruning", "worse (statistics)"] == 1
    assert beats.loc["pruning", "lower latency"] == 2 and beats.loc["factorization", "lower latency"] == 0
    assert beats.loc["factorization", "lowest latency"] == "none" and beats.loc["factorization", "smaller"] == 2
    assert beats.loc["combination", "models"] == 0


@pytest.mark.parametrize("source, accuracies, expect", [
    ("cifar10", {"q_small": 91.0, "p_fast": 90.5, "base": 92.0}, "**Met by p_fast**"),  # lowest score at ≥ 90%
    ("cifar10", {}, "**Not met**: no model reaches 90%"),
    ("mini", {"q_small": 95.0}, "not judged here"),
])
def test_course_target_names_the_lowest_score_at_the_target_accuracy(source, accuracies, expect):
    s, df = _frame()
    for name, acc in accuracies.items():
        df.loc[name, summary.ACC] = acc
    s.reference = SimpleNamespace(dataset=SimpleNamespace(source=source, describe=lambda: f"{source} data"))
    assert expect in summary.course_target(s, df, 90.0)


def test_summary_params_are_checked(tmp_path):
    with pytest.raises(params.ParamsError, match="'max_drop'"):
        params.validate({"max_drop": -1.0}, "summary")
    with pytest.raises(params.ParamsError, match="unknown parameter 'epochs'"):
        params.validate({"epochs": 3}, "summary")


def test_summary_without_a_baseline_names_the_command(tmp_path):
    with pytest.raises(baselines.UpstreamMissing, match="papermill notebooks/01_baseline.ipynb"):
        _summarize(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_summary_writes_only_each_runs_onnx_file_and_only_once(store, summarized):
    exported = (export.FILE, export.RECORD)
    _, before, made = summarized
    assert not any(p.name in exported for p in before)
    assert {p: t for p, t in made.items() if p.name not in exported} == before
    assert {p.parent for p in made if p.name == export.FILE} == {p.parent for p in made if p.name == export.RECORD}
    _summarize(store)
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == made  # reused, not made again


def test_without_onnx_the_summary_has_one_engine(store):
    s = _summarize(store, onnx=False)
    df = summary.table(s)
    assert not s.onnx and summary.AGREEMENT not in df and not any("ONNX" in c for c in df.columns)
    assert "off" in summary.engines(s, df, 2.0) and not any("ONNX" in k for k in summary.criteria(s))


def test_stored_metrics_are_json(store):
    for run in runs.RunStore(store).runs():
        if run.done:
            json.loads(run.path("metrics.json").read_text())


def test_replicates_over_seeds_are_named_paired_with_their_own_seed_and_summarized(baseline_store):
    root = baseline_store  # the smoke baseline on both of its seeds (conftest)
    factorization.run(_stage_params("svd_smoke.yaml", "svd", root, ranks=[0.5], variants=[], then=[], scratch_ranks=[],
                                    epochs=1, baseline_seeds=[0, 1]))
    s = _summarize(root)
    df = summary.table(s)
    assert list(df.index) == ["baseline (FP32, width 8)", "baseline (FP32, width 8), seed 1", "SVD 0.5 of full rank",
                              "SVD 0.5 of full rank, seed 1"]
    assert list(df[summary.VERDICT].iloc[:2]) == ["reference", "seed 1"]
    assert df.loc["SVD 0.5 of full rank, seed 1", summary.DELTA] == pytest.approx(
        df.loc["SVD 0.5 of full rank, seed 1", summary.ACC] - df.loc["baseline (FP32, width 8), seed 1", summary.ACC])
    assert s.verdicts.spread.n == 2 and s.verdicts.df == 1  # one recipe on two seeds: one degree of freedom
    assert "2 training seeds" in results.noise(s.verdicts)
    seeds = summary.seeds_table(s)
    assert list(seeds["n"]) == [2, 2] and list(seeds["technique"]) == ["baseline", "svd"]
    assert seeds.loc["SVD 0.5 of full rank", "Δ mean (pt)"] == pytest.approx(
        df.loc[["SVD 0.5 of full rank", "SVD 0.5 of full rank, seed 1"], summary.DELTA].mean())


def test_the_cli_exports_one_run_and_reuses_the_summarys_file(store, summarized, python, capsys):
    import subprocess

    folder = next(r.dir for r in runs.RunStore(store).runs("int8") if r.done)
    out = subprocess.run([python, "-m", "resnet_lab", "export", str(folder)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"reused {folder / export.FILE}") and "int8 QDQ graph" in out.stdout
    (folder / export.RECORD).unlink()  # the same command again, in this process
    capsys.readouterr()
    assert main(["export", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("wrote") and "% of " in printed
