"""06_summary: every run in the store read back, measured again side by side, compared with the baseline.

Nothing is copied from the other reports: each model is rebuilt from its saved file and its test
accuracy, counts, size on disk, scores and CPU speed are computed here (a stored accuracy that the
saved model does not reproduce is flagged). A run that cannot be used (unfinished, damaged, made on
other data) is listed with the reason, never dropped. With `onnx` each model is also exported to ONNX into
its run folder (once; `export.ensure`), checked against its PyTorch model on the test set, and timed in ONNX
Runtime in the same interleaved rounds as in eager PyTorch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from torch import nn
from tqdm.auto import tqdm

import numpy as np

from . import baselines, export, layer_times, metrics, params, registry, results, runs, stats, steps, train

IN_TABLE = "in the table"
ACC, VAL, DELTA, SIZE, MACS = steps.ACC, steps.VAL, steps.DELTA, steps.SIZE, steps.MACS
ACC_CI, P_BASELINE, VERDICT = steps.ACC_CI, steps.P_BASELINE, steps.VERDICT
IMAGES, RECIPE, P_RECIPE, BASIS = steps.IMAGES, steps.RECIPE, steps.P_RECIPE, steps.BASIS
GROUPS = params.GROUPS
# a recomputed accuracy may differ from the stored one by float rounding on another device, not by more
ACC_TOLERANCE = 0.25
PYTORCH, ORT = export.PYTORCH, export.ORT
AGREEMENT = "ONNX agreement (%)"
STABILITY = "quantized model vs itself, input noise (%)"  # export.stability: what single rounding steps decide


@dataclass
class Summary:
    reference: baselines.BaselineResult
    latency_col: str
    throughput_col: str
    rows: list[dict[str, Any]] = field(default_factory=list)    # one per usable model, recomputed
    models: dict[str, nn.Module] = field(default_factory=dict)  # model name -> inference model (CPU)
    runs: list[dict[str, str]] = field(default_factory=list)    # every run folder and what became of it
    correct: dict[str, np.ndarray] = field(default_factory=dict)  # model name -> per-test-image correctness
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # model name -> 95% Wilson (%)
    verdicts: results.Verdicts | None = None  # Δ, interval, paired test and verdict of every row (`results.judge`)
    # model name -> batch size -> where its CPU time goes (layer_times.profile), for the groups of `profile_groups`
    profiles: dict[str, dict[int, layer_times.Profile]] = field(default_factory=dict)
    # model name -> its ONNX file and the agreement of its predictions (`onnx`), or why it could not be exported
    onnx: dict[str, export.Exported] = field(default_factory=dict)
    onnx_errors: dict[str, str] = field(default_factory=dict)
    # model name -> the model its speed is timed on and its ONNX file made for: its recipe's model from the reference
    # seed when both have the same MACs and parameters (then they compute the same operations: `steps.Result.timed_as`)
    timed: dict[str, str] = field(default_factory=dict)
    # (engine, timed model name, "throughput" or "latency") -> its `metrics.compare_speed` entry (rounds included)
    timings: dict[tuple[str, str, str], dict] = field(default_factory=dict)
    ort_latency_col: str = ""
    ort_throughput_col: str = ""


def run(p: dict) -> Summary:
    """Read every run of `p['run_root']`, rebuild and measure each model made on the data of the reference
    baseline (`p['baseline']`), then time them all on the CPU side by side. Which kinds of run hold a model, and
    how to load it, is the registry's knowledge; nothing here names a technique."""
    base, bp = baselines.trained(p["baseline"], p)
    out = Summary(base, f"CPU latency (ms, batch {p['latency_batch_size']})",
                  f"CPU throughput (img/s, batch {p['measure_batch_size']})")
    reader = _Reader(p, bp, base, out)
    order = list(registry.techniques()) + list(registry.analyses())
    for r in sorted(runs.RunStore(p["run_root"]).runs(),
                    key=lambda r: (r.key != base.run.key, order.index(r.stage) if r.stage in order else len(order), r.key)):
        reader.read(r)
    reader.name_and_export()
    if p["progress"]:
        print(f"timing {len(out.models)} models on the CPU, side by side ...", flush=True)
    engines = {(PYTORCH, name): out.models[name] for name in dict.fromkeys(out.timed.values())}
    if p["onnx"]:
        out.ort_latency_col = f"{ORT} latency (ms, batch {p['latency_batch_size']})"
        out.ort_throughput_col = f"{ORT} throughput (img/s, batch {p['measure_batch_size']})"
        engines |= {(ORT, name): export.OrtModel(e.path) for name, e in out.onnx.items()}
    speed = metrics.compare_speed(engines, p["measure_batch_size"], rounds=p["speed_rounds"], repeats=p["speed_repeats"])
    latency = metrics.compare_speed(engines, p["latency_batch_size"], rounds=p["speed_rounds"], repeats=p["latency_repeats"])
    out.timings = {(e, n, kind): t[e, n] for kind, t in (("throughput", speed), ("latency", latency)) for e, n in t}
    _judge(out)
    nan = float("nan")
    for row in out.rows:
        name = out.timed[row["model"]]
        row[out.latency_col] = latency[PYTORCH, name]["latency_ms"]
        row[out.throughput_col] = speed[PYTORCH, name]["throughput_img_s"]
        if p["onnx"]:
            row[out.ort_latency_col] = latency[ORT, name]["latency_ms"] if (ORT, name) in latency else nan
            row[out.ort_throughput_col] = speed[ORT, name]["throughput_img_s"] if (ORT, name) in speed else nan
    shown = table(out)  # in table order: the first timed model of each technique within each group of `profile_groups`
    shown = shown[shown.index.map(lambda n: out.timed[n] == n) & shown["group"].isin(p["profile_groups"])]
    chosen = list(shown.groupby(["group", "technique"], sort=False).head(1).index)
    cost = layer_times.event_cost() if chosen else 0.0  # the profiler's own cost per op, once for all models
    for name in (tqdm(chosen, desc="profiling layer by layer", disable=not p["progress"]) if chosen else []):
        out.profiles[name] = {b: layer_times.profile(out.models[name], b, p["profile_rounds"], repeats, cost=cost)
                              for b, repeats in ((p["measure_batch_size"], p["speed_repeats"]),
                                                 (p["latency_batch_size"], p["latency_repeats"]))}
    return out


def _rows(out: Summary) -> list[results.Row]:
    return [results.Row(r["model"], r["technique"], r["group"], r["origin"], r["replicate"], r[ACC],
                        out.correct[r["model"]], r["recipe key"], r["notebook"]) for r in out.rows]


def _baselines(rows: list[results.Row]) -> list[results.Row]:
    """The reference baseline (the first row) and its replicates: what each model is judged against."""
    return [rows[0]] + [r for r in rows[1:] if r.is_seed_baseline]


def _judge(out: Summary) -> None:
    """Each row's Δ, interval and verdict (`results.judge`)."""
    rows = _rows(out)
    out.verdicts = results.judge(rows, _baselines(rows))
    for row in out.rows:
        j = out.verdicts[row["model"]]
        out.intervals[row["model"]] = j.interval
        row |= {DELTA: j.delta, ACC_CI: stats.interval_text(*j.interval), P_BASELINE: j.p, IMAGES: j.images,
                P_RECIPE: j.recipe.p if j.recipe else None, RECIPE: j.recipe.verdict if j.recipe else None,
                VERDICT: j.verdict, BASIS: j.basis}


class _Reader:
    def __init__(self, p: dict, bp: dict, base: baselines.BaselineResult, out: Summary):
        self.p, self.bp, self.base, self.out = p, bp, base, out
        self.store = runs.RunStore(p["run_root"])
        self.baselines: dict[str, nn.Module] = {base.run.key: base.model.eval()}
        self.techniques, self.analyses = registry.techniques(), registry.analyses()
        self.recipe = results.without_seed(base.run.params)  # what a replicate of the reference baseline shares
        self.keys: dict[str, str] = {}  # run ref -> recipe key (what a model is apart from its seed)
        self.pending: list[tuple[runs.Run, nn.Module, bool, Any]] = []  # what `name_and_export` finishes

    def read(self, run: runs.Run) -> None:
        tech, analysis = self.techniques.get(run.stage), self.analyses.get(run.stage)
        entry = {"notebook": (tech or analysis).notebook if (tech or analysis) else "?", "stage": run.stage,
                 "run": str(run), "model": "", "status": IN_TABLE}
        self.out.runs.append(entry)
        if analysis:
            entry["status"] = analysis.description
        elif tech is None:
            entry["status"] = "not read: unknown stage"
        elif not run.done:
            entry["status"] = "unfinished: no metrics.json (still running, or interrupted: rerun its notebook to finish it)"
        else:
            try:
                self._add(tech, run, entry)
            except (runs.RunStoreError, KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
                entry["status"] = f"unusable: {e}"

    def _add(self, tech: registry.Technique, run: runs.Run, entry: dict) -> None:
        stored = run.metrics  # raises on a damaged metrics.json
        origin = run if run.stage == "baseline" else runs.Run(self.store, "baseline", run.params["baseline"])
        if not origin.done:
            raise runs.RunStoreError(f"the baseline it was made from ({origin}) is not in the store")
        obp = origin.params
        if not _same_test_set(obp, self.bp):
            entry["status"] = f"not compared: made on other data ({obp['data']}), so its accuracy is not comparable"
            return
        model = tech.load(run)
        name = f"{run.stage}/{run.key}"  # until `name_and_export` names every model by one rule
        entry["model"] = name
        first = self.techniques.get((stored.get("lineage") or [run.stage])[0])
        if first is not None:  # a chain is listed under the notebook whose technique starts it (04's pruned → INT8)
            entry["notebook"] = first.notebook  # its verdict pools its Δ spread with that notebook's recipes
        device = "cpu" if tech.cpu_only else train.pick_device(self.p["device"])
        test = self.base.dataset.test
        logits = train.predict_split(model, test, self.p["eval_batch_size"], obp["eval_flip"], device)
        acc = train.score(logits, test.labels.cpu())["acc"]
        root = self._baseline(origin)
        m = steps.measure(model, root if stored.get("pruned") else None, root)
        links = stored.get("links", 0)
        parent = stored.get("parent_label") or ""
        replicate = self._replicate(origin)
        self.out.rows.append({
            "origin": origin.key, "replicate": replicate, "recipe key": results.recipe_key(run, self.keys),
            "twin key": results.recipe_key(run, self.keys, twin=True), "seed": run.params.get("seed"),
            "label": results.baseline_label(run.params["width"]) if run.stage == "baseline" else stored["label"],
            "distill": (run.params.get("distill") or {}) if run.stage != "baseline" else {},
            "group": tech.family if links <= 1 else "combination", "technique": run.stage, "family": tech.family,
            "links": links, "parent": parent, "model": name, "recipe": _recipe(obp if run.stage == "baseline" else stored.get("settings") or {}), ACC: acc,
            VAL: stored.get("val_acc"), "parameters": m["params"], "nonzero parameters": m["nonzero_params"],
            MACS: m["macs"], "MACs over nonzero weights": m["sparse_macs"],
            SIZE: run.file(tech.artifact).stat().st_size / 1e3,  # the file the model was loaded from
            "course score": m["score"], "MicroNet score": m["micronet_score"],
            "stored test accuracy (%)": stored.get("test_acc"), "run": str(run), "stage": run.stage,
            "notebook": entry["notebook"]})
        self.out.models[name] = model
        self.out.correct[name] = stats.correct(logits.argmax(1).numpy(), test.labels.cpu().numpy())
        self.pending.append((run, model, obp["eval_flip"], logits))

    def name_and_export(self) -> None:
        """Every model named by the one rule (`results.names`), then exported to ONNX (`onnx`) under that name."""
        final = results.names([(r["label"], r["run"].rsplit("/", 1)[-1], r["origin"], r["replicate"], r["seed"])
                               for r in self.out.rows], self.base.run.key)
        renamed = {r["model"]: name for r, name in zip(self.out.rows, final)}
        for r in self.out.rows:
            r["model"] = renamed[r["model"]]
        for e in self.out.runs:
            e["model"] = renamed.get(e["model"], e["model"])
        self.out.models = {renamed[k]: v for k, v in self.out.models.items()}
        self.out.correct = {renamed[k]: v for k, v in self.out.correct.items()}
        first: dict[tuple, str] = {}  # its recipe's model from the reference baseline, if of the same shapes
        ops = {r["model"]: (r["recipe key"], r[MACS], r["parameters"]) for r in self.out.rows}
        for r in sorted(self.out.rows, key=lambda r: r["origin"] != self.base.run.key):
            first.setdefault(ops[r["model"]], r["model"])
        self.out.timed = {r["model"]: first[ops[r["model"]]] for r in self.out.rows}
        if self.p["onnx"]:
            for row, (run, model, flip, logits) in zip(self.out.rows, self.pending):
                if self.out.timed[row["model"]] == row["model"]:
                    self._export(run, model, row["model"], flip, logits, row)
                else:  # its recipe's file answers for it (the same operations): not exported again
                    row[AGREEMENT], row["ONNX file (KB)"] = float("nan"), float("nan")

    def _export(self, run: runs.Run, model: nn.Module, name: str, flip: bool, logits, row: dict) -> None:
        """The model's ONNX file in its run folder (made once) and its agreement with the PyTorch model on the test
        set; a model that cannot be exported stays in the table, with the reason listed."""
        try:
            e = export.ensure(run, model, self.base.dataset.test, flip, logits.argmax(1), self.p["eval_batch_size"], name)
        except Exception as err:  # torch.onnx and onnxruntime raise many types; the reason is shown, the model kept
            self.out.onnx_errors[name] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            row[AGREEMENT], row["ONNX file (KB)"] = float("nan"), float("nan")
            return
        self.out.onnx[name] = e
        row[AGREEMENT], row["ONNX file (KB)"] = e.agreement, e.size_kb

    def _baseline(self, run: runs.Run) -> nn.Module:
        if run.key not in self.baselines:
            self.baselines[run.key] = baselines.load_model(run)
        return self.baselines[run.key]

    def _replicate(self, origin: runs.Run) -> int | None:
        """The training seed of a baseline run that is the reference baseline or one of its replicates (the same
        recipe and split, another seed); None for another baseline."""
        if results.without_seed(origin.params) != self.recipe:
            return None
        return origin.params.get("train_seed", origin.params["seed"])


def _same_test_set(a: dict, b: dict) -> bool:
    keys = ["data"] + (["synthetic_train", "synthetic_test", "seed"] if a["data"] == "synthetic" else [])
    return all(a[k] == b[k] for k in keys)


def _recipe(settings: dict) -> str:
    """How the last step trained, in a few words (its settings, or the baseline's params); a conversion trains
    nothing."""
    if "epochs" in settings:
        n = settings["epochs"]
        return f"{n} epoch{'s' if n != 1 else ''}, {settings['optimizer']} lr {settings['lr']:g}, seed {settings['seed']}"
    return "converted, no training"


# ---------------------------------------------------------------- the tables
def table(s: Summary) -> pd.DataFrame:
    """The side-by-side table: one row per model (its name is its lineage), grouped by technique family, the
    models of two or more steps last; `group`, `technique`, `links` and `parent` are fields to select by."""
    cols = ["group", "technique", "links", "parent", "recipe", ACC, ACC_CI, VAL, DELTA, P_BASELINE, IMAGES, P_RECIPE,
            RECIPE, VERDICT, BASIS, "parameters", "nonzero parameters", MACS,
            SIZE, s.latency_col, s.throughput_col]
    cols += [s.ort_latency_col, s.ort_throughput_col, AGREEMENT, "ONNX file (KB)"] if s.ort_latency_col else []
    cols += ["course score", "MicroNet score"]
    df = pd.DataFrame(s.rows).set_index("model")
    first = {name: i for i, name in reversed(list(enumerate(s.timed.get(n, n) for n in df.index)))}
    order = pd.DataFrame({"group": df["group"].map(GROUPS.index), "recipe": [first[s.timed.get(n, n)] for n in df.index],
                          "seed": [n != s.timed.get(n, n) for n in df.index]}, index=df.index)
    return df.loc[order.sort_values(["group", "recipe", "seed"], kind="stable").index, cols]  # replicates together


def intervals(s: Summary) -> pd.DataFrame:
    """The 95% interval of each model's test accuracy (columns `low`, `high`, in %), for error bars."""
    return pd.DataFrame.from_dict(s.intervals, orient="index", columns=["low", "high"])


KD_COLUMNS = ["distillation", "validation without (%)", "validation with (%)", "Δ validation (pt)",
              "test without (%)", "test with (%)", "Δ test (pt)", "p, test (paired)", "chosen on validation"]


def distillation(s: Summary) -> pd.DataFrame:
    """Each model fine-tuned both without and with knowledge distillation (the same recipe, parent, baseline and
    seed; only `distill` differs): validation and test accuracy side by side, the paired test on the test images
    (McNemar's exact test, Benjamini–Hochberg over the table), and which of the two the validation split chooses
    (a tie keeps the plain fine-tune). The test set is only reported, never used to choose. Index: the model
    fine-tuned without distillation."""
    plain = {(r["twin key"], r["origin"], r["seed"]): r for r in s.rows if not r["distill"]}
    pairs = [(plain[(r["twin key"], r["origin"], r["seed"])], r) for r in s.rows
             if r["distill"] and (r["twin key"], r["origin"], r["seed"]) in plain]
    if not pairs:
        return pd.DataFrame(columns=KD_COLUMNS)
    tests = [stats.mcnemar(s.correct[kd["model"]], s.correct[off["model"]]) for off, kd in pairs]
    judged = stats.verdicts(tests)
    rows = []
    for (off, kd), (p, _) in zip(pairs, judged):
        d = kd["distill"]
        val_off, val_kd = off[VAL], kd[VAL]
        rows.append({"model": off["model"], KD_COLUMNS[0]: f"α {d['alpha']:g}, T {d['temperature']:g}, teacher {d['teacher']}",
                     KD_COLUMNS[1]: val_off, KD_COLUMNS[2]: val_kd,
                     KD_COLUMNS[3]: val_kd - val_off if val_off is not None and val_kd is not None else float("nan"),
                     KD_COLUMNS[4]: off[ACC], KD_COLUMNS[5]: kd[ACC], KD_COLUMNS[6]: kd[ACC] - off[ACC], KD_COLUMNS[7]: p,
                     KD_COLUMNS[8]: "with" if val_off is not None and val_kd is not None and val_kd > val_off else "without",
                     "with distillation": kd["model"]})
    return pd.DataFrame(rows).set_index("model")


def distillation_text(kd: pd.DataFrame) -> str:
    """Where distillation helped on validation, by how much, and whether the test set agrees, in sentences."""
    if kd.empty:
        return ("No model was fine-tuned both with and without distillation here (set `distill` on a variant "
                "beside the same variant without it).")
    lines = []
    for name, r in kd.iterrows():
        val, test = np.sign(r["Δ validation (pt)"]), np.sign(r["Δ test (pt)"])
        agree = ("unchanged" if test == 0 else "validation did not move" if val == 0
                 else "the same direction" if test == val else "the other direction")
        lines.append(f"**{name}**: distillation {r['Δ validation (pt)']:+.2f} pt on validation "
                     f"(→ {r['chosen on validation']}), {r['Δ test (pt)']:+.2f} pt on test ({agree}; paired "
                     f"p = {r['p, test (paired)']:.2g}, adjusted).")
    return "  \n".join(lines)


def runs_table(s: Summary) -> pd.DataFrame:
    """Every run folder of the store and what the summary made of it."""
    return pd.DataFrame(s.runs, columns=["notebook", "stage", "run", "model", "status"])


def unusable(s: Summary) -> list[dict[str, str]]:
    return [e for e in s.runs if e["status"].startswith(("unfinished", "unusable", "not read"))]


def mismatches(s: Summary) -> list[str]:
    """Models whose saved file does not reproduce the accuracy their run stored."""
    return [f"{r['model']}: stored {r['stored test accuracy (%)']:.2f}%, recomputed {r[ACC]:.2f}% ({r['run']})"
            for r in s.rows if r["stored test accuracy (%)"] is not None
            and abs(r["stored test accuracy (%)"] - r[ACC]) > ACC_TOLERANCE]


def pareto(df: pd.DataFrame, cost: str, higher_is_better: bool = False) -> pd.Series:
    """True for each model no other model beats: another as accurate or more, at a cost as low or lower
    (as high or higher for a `higher_is_better` measure), better in one of the two."""
    c = -df[cost] if higher_is_better else df[cost]
    a = df[ACC]
    return pd.Series([not ((c <= ci) & (a >= ai) & ((c < ci) | (a > ai))).any() for ci, ai in zip(c, a)], index=df.index)


def criteria(s: Summary) -> dict[str, tuple[str, bool]]:
    """criterion -> (column, whether higher is better)."""
    out = {"test accuracy": (ACC, True), "size on disk": (SIZE, False), "MACs": (MACS, False),
           "CPU latency, PyTorch": (s.latency_col, False), "CPU throughput, PyTorch": (s.throughput_col, True)}
    if getattr(s, "ort_latency_col", ""):
        out |= {"CPU latency, ONNX Runtime": (s.ort_latency_col, False),
                "CPU throughput, ONNX Runtime": (s.ort_throughput_col, True)}
    return out | {"course score": ("course score", False), "MicroNet score": ("MicroNet score", False)}


def competing(df: pd.DataFrame, max_drop: float) -> pd.DataFrame:
    """The models that compete on cost: at most `max_drop` points below their baseline, and not found worse by the
    statistics (the `verdict` column: the recipe's over seeds where it was replicated, else these images')."""
    ok = df[DELTA] >= -max_drop
    if VERDICT in df:
        ok &= df[VERDICT] != stats.WORSE
    return df[ok]


def best(s: Summary, df: pd.DataFrame, max_drop: float) -> pd.DataFrame:
    """The best model per criterion: over all models, and over those that compete on cost (`competing`). A cost
    (size, MACs, time, score) is measured, so its best is named with its accuracy's verdict beside it; the most
    accurate model is named only when the statistics find it better than the baseline, else the baseline stays."""
    close = competing(df, max_drop)
    within = f"≤ {max_drop:g} pt below the baseline, not worse"
    rows = {}
    for name, (col, higher) in criteria(s).items():
        row = {}
        for group, pool in (("any accuracy", df), (within, close)):
            if col == ACC and VERDICT in pool:
                better = pool[pool[VERDICT] == stats.BETTER]
                winner = better[col].idxmax() if len(better) else df.index[0]
            else:
                winner = pool[col].idxmax() if higher else pool[col].idxmin()
            row |= {(group, "model"): winner, (group, "value"): pool.loc[winner, col] if winner in pool.index else df.loc[winner, col],
                    (group, ACC): df.loc[winner, ACC], (group, VERDICT): df.loc[winner, VERDICT] if VERDICT in df else "",
                    (group, BASIS): df.loc[winner, BASIS] if BASIS in df else ""}
        rows[f"{name} ({col.split('(', 1)[1].rstrip(')')})" if "(" in col else name] = row
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    return out


def most_accurate(df: pd.DataFrame) -> str:
    """Which model is more accurate than the baseline, in a sentence the statistics support."""
    if VERDICT not in df:
        return ""
    better = df[df[VERDICT] == stats.BETTER]
    top = df.iloc[1:][ACC].idxmax() if len(df) > 1 else None
    if len(better):
        win = better[ACC].idxmax()
        return (f"{len(better)} model(s) are more accurate than their baseline; the most accurate: {win} "
                f"({better.loc[win, DELTA]:+.2f} pt, {_verdict(better, win)})")
    if top is None:
        return "no other model"
    return (f"no model is detectably more accurate than the baseline (the highest point estimate, {top} at "
            f"{df.loc[top, DELTA]:+.2f} pt, is within the noise)")


def beats_baseline(s: Summary, df: pd.DataFrame) -> pd.DataFrame:
    """Per group of models (each technique family, and the combinations): how many are smaller or faster than
    the baseline, and the best of each (with its accuracy's Δ and verdict), and how many the statistics find worse."""
    ref = df.iloc[0]
    rows = {}
    for group in GROUPS[1:]:
        mine = df[df["group"] == group]
        smaller = mine[mine[SIZE] < ref[SIZE]]
        faster = mine[mine[s.latency_col] < ref[s.latency_col]]
        more = mine[mine[s.throughput_col] > ref[s.throughput_col]]
        rows[group] = {
            "models": len(mine),
            "worse (statistics)": int((mine[VERDICT] == stats.WORSE).sum()) if VERDICT in mine else 0,
            "smaller": len(smaller), "smallest": _best_of(smaller, SIZE, "{:,.0f} KB", ref[SIZE], "smaller"),
            "lower latency": len(faster),
            "lowest latency": _best_of(faster, s.latency_col, "{:.2f} ms", ref[s.latency_col], "faster"),
            "higher throughput": len(more),
            "highest throughput": _best_of(more, s.throughput_col, "{:,.0f} img/s", ref[s.throughput_col], "more", higher=True)}
    return pd.DataFrame.from_dict(rows, orient="index")


def _best_of(pool: pd.DataFrame, col: str, fmt: str, ref: float, word: str, higher: bool = False) -> str:
    if pool.empty:
        return "none"
    name = pool[col].idxmax() if higher else pool[col].idxmin()
    ratio = pool.loc[name, col] / ref if higher else ref / pool.loc[name, col]
    verdict = f", {_verdict(pool, name)}" if VERDICT in pool else ""
    return f"{name}: {fmt.format(pool.loc[name, col])} ({ratio:.2f}× {word}, {pool.loc[name, DELTA]:+.2f} pt{verdict})"


def course_target(s: Summary, df: pd.DataFrame, target: float) -> str:
    """Whether the course target (≥ target % test accuracy at the lowest course score) is met, and by which model."""
    data = s.reference.dataset
    if data.source != "cifar10":
        top = df[ACC].idxmax()
        return (f"The course target (≥ {target:g}% test accuracy, then the lowest course score) is judged on the full "
                f"CIFAR-10 test set (the full profile: `make report PROFILE=full`). These runs use {data.describe()}, "
                f"so it is not judged here; the most accurate model on this data is {top} ({df.loc[top, ACC]:.2f}%).")
    ok = df[df[ACC] >= target]
    if ok.empty:
        top = df[ACC].idxmax()
        return (f"**Not met**: no model reaches {target:g}% on the CIFAR-10 test set; the most accurate is {top} "
                f"({df.loc[top, ACC]:.2f}%).")
    winner = ok["course score"].idxmin()
    return (f"**Met by {winner}**: {df.loc[winner, ACC]:.2f}% test accuracy at course score "
            f"**{df.loc[winner, 'course score']:.4f}**, the lowest of the {len(ok)} models at ≥ {target:g}% "
            f"(the FP32 baseline: {df.iloc[0][ACC]:.2f}%, score {df.iloc[0]['course score']:.4f}).")


# ---------------------------------------------------------------- deployed: ONNX Runtime beside eager PyTorch
def onnx_table(s: Summary, p: dict) -> pd.DataFrame:
    """Per model: its ONNX file, how it was made, the agreement of its test-set predictions with the PyTorch
    model's against the threshold of its kind, and both engines' speed with their ratio (ONNX Runtime over
    eager PyTorch, the same model)."""
    rows, by_name = [], {row["model"]: row for row in s.rows}
    for name in [n for n in table(s).index if s.timed.get(n, n) == n]:  # in the table's order, one per recipe
        row, e = by_name[name], s.onnx.get(name)
        if e is None:
            rows.append({"model": name, "ONNX file": "not exported: " + s.onnx_errors.get(name, "onnx is off")})
            continue
        need = _required(e, p)
        rows.append({"model": name, "ONNX file": runs.shown(e.path), "graph": "quantized (QDQ)" if e.quantized else "float32",
                     "file (KB)": e.size_kb, AGREEMENT: e.agreement, "required (%)": need,
                     STABILITY: e.stability if e.stability is not None else float("nan"),
                     "check": "ok" if e.agreement >= need else f"FLAGGED: below {need:g}%",
                     f"latency, {PYTORCH} (ms)": row[s.latency_col], f"latency, {ORT} (ms)": row[s.ort_latency_col],
                     f"{ORT} ÷ {PYTORCH} speed, batch {_batch(s.latency_col)} (×)": row[s.latency_col] / row[s.ort_latency_col],
                     f"throughput, {PYTORCH} (img/s)": row[s.throughput_col], f"throughput, {ORT} (img/s)": row[s.ort_throughput_col],
                     f"{ORT} ÷ {PYTORCH} speed, batch {_batch(s.throughput_col)} (×)": row[s.ort_throughput_col] / row[s.throughput_col]})
    return pd.DataFrame(rows).set_index("model")


def _required(e: export.Exported, p: dict) -> float:
    """The agreement an exported model must reach: `onnx_agreement_quantized` for a quantized graph, else `onnx_agreement`."""
    return p["onnx_agreement_quantized"] if e.quantized else p["onnx_agreement"]


def engine_speedups(s: Summary, df: pd.DataFrame) -> pd.DataFrame:
    """Long table for a figure: per exported model and engine, its speed-up over the eager PyTorch baseline in
    latency (latency batch) and in throughput (measure batch)."""
    if not s.ort_latency_col:
        return pd.DataFrame(columns=["model", "engine", "measure", "speed-up (×)"])
    ref, rows = df.iloc[0], []
    lat, thr = f"latency, batch {_batch(s.latency_col)}", f"throughput, batch {_batch(s.throughput_col)}"
    for name, r in df.dropna(subset=[s.ort_latency_col]).iterrows():
        if s.timed.get(name, name) != name:
            continue  # a replicate: its recipe's bars
        for engine, lat_col, thr_col in ((PYTORCH, s.latency_col, s.throughput_col),
                                         (ORT, s.ort_latency_col, s.ort_throughput_col)):
            rows += [{"model": name, "engine": engine, "measure": lat, "speed-up (×)": ref[s.latency_col] / r[lat_col]},
                     {"model": name, "engine": engine, "measure": thr, "speed-up (×)": r[thr_col] / ref[s.throughput_col]}]
    return pd.DataFrame(rows)


def flagged(s: Summary, p: dict) -> list[str]:
    """Models whose ONNX file could not be made, or whose predictions agree with the PyTorch model's below the
    threshold of their kind."""
    out = [f"{name}: no ONNX file ({why})" for name, why in s.onnx_errors.items()]
    for name, e in s.onnx.items():
        need = _required(e, p)
        if e.agreement < need:
            out.append(f"{name}: its ONNX file agrees with the PyTorch model on {e.agreement:.2f}% of the "
                       f"{e.images} test images, below {need:g}% ({runs.shown(e.path)})"
                       + (f"; the PyTorch model itself keeps its prediction on {e.stability:.2f}% of them when its "
                          f"input moves by noise of {export.NOISE_LEVELS:g} pixel levels, so its integer rounding, which "
                          "ONNX Runtime's kernels do differently, decides the rest" if e.stability is not None else ""))
    return out


def engines(s: Summary, df: pd.DataFrame, max_drop: float) -> str:
    """What deploying through ONNX Runtime gives, in sentences computed from the table: the models that compete on
    cost (`competing`) with the lowest latency and the highest throughput in ONNX Runtime, against the eager
    PyTorch baseline, and what the engine alone gives the baseline."""
    if not s.ort_latency_col:
        return "ONNX export is off (`onnx: false`)."
    ref = df.iloc[0]
    pool = competing(df, max_drop).dropna(subset=[s.ort_latency_col])
    if pool.empty:
        return "No model was exported to ONNX."
    fast, many = pool[s.ort_latency_col].idxmin(), pool[s.ort_throughput_col].idxmax()
    lat, thr = _batch(s.latency_col), _batch(s.throughput_col)
    return (f"The engine alone: the baseline answers {lat} image(s) in {ref[s.latency_col]:.2f} ms in eager PyTorch and "
            f"{ref[s.ort_latency_col]:.2f} ms in ONNX Runtime ({ref[s.latency_col] / ref[s.ort_latency_col]:.1f}×), and "
            f"runs batch {thr} at {ref[s.throughput_col]:,.0f} and {ref[s.ort_throughput_col]:,.0f} img/s "
            f"({ref[s.ort_throughput_col] / ref[s.throughput_col]:.1f}×). Engine and compression together, among the "
            f"models at most {max_drop:g} pt below their baseline and not found worse: **{fast}** answers in "
            f"{pool.loc[fast, s.ort_latency_col]:.2f} ms in ONNX Runtime, **{ref[s.latency_col] / pool.loc[fast, s.ort_latency_col]:.1f}× "
            f"faster than the eager PyTorch baseline** ({pool.loc[fast, DELTA]:+.2f} pt, {_verdict(pool, fast)}); "
            f"**{many}** runs batch {thr} at {pool.loc[many, s.ort_throughput_col]:,.0f} img/s, "
            f"**{pool.loc[many, s.ort_throughput_col] / ref[s.throughput_col]:.1f}× the eager PyTorch baseline** "
            f"({pool.loc[many, DELTA]:+.2f} pt, {_verdict(pool, many)}).")


# ---------------------------------------------------------------- where the time goes
def speedups(s: Summary, df: pd.DataFrame) -> pd.DataFrame:
    """Predicted speed-up (the MAC reduction) against the measured ones, per model: throughput at the measure batch
    size and latency at the latency batch size, both over the baseline's, from the side-by-side timing."""
    ref = df.iloc[0]
    out = pd.DataFrame({"group": df["group"], "MAC reduction (×)": ref[MACS] / df[MACS],
                        f"speed-up at batch {_batch(s.throughput_col)} (×)": df[s.throughput_col] / ref[s.throughput_col],
                        f"speed-up at batch {_batch(s.latency_col)} (×)": ref[s.latency_col] / df[s.latency_col]})
    return out


def _batch(col: str) -> str:
    return col.rsplit("batch ", 1)[1].rstrip(")")


def time_breakdown(s: Summary) -> pd.DataFrame:
    """Long table: model, batch size, kind of work, ms per batch (`layer_times.CATEGORIES`)."""
    return pd.DataFrame([{"model": name, "batch size": b, "kind": kind, "ms per batch": ms}
                         for name, by_batch in s.profiles.items() for b, prof in by_batch.items()
                         for kind, ms in prof.categories.items()])


def profile_check(s: Summary) -> pd.DataFrame:
    """Per model and batch size: the profiled total (less the profiler's own cost), the unprofiled latency measured
    in the same rounds, their ratio, and the conv + linear share of the time."""
    rows = []
    for name, by_batch in s.profiles.items():
        for b, prof in by_batch.items():
            convs = sum(v for k, v in prof.categories.items() if k in layer_times.STAGES or k == layer_times.LINEAR)
            rows.append({"model": name, "batch size": b, "profiled total (ms)": prof.total_ms,
                         "measured latency (ms)": prof.measured_ms, "profiled ÷ measured": prof.ratio,
                         "conv + linear share (%)": 100 * convs / prof.total_ms,
                         "framework overhead share (%)": 100 * prof.categories[layer_times.OVERHEAD] / prof.total_ms,
                         "profiler cost taken off (µs per op)": prof.event_cost_us})
    return pd.DataFrame(rows)


def layer_shares(s: Summary) -> pd.DataFrame:
    """Long table: model, layer, its kind, and as shares (%) of the model's conv + linear total: its MACs and its
    measured time at each profiled batch size."""
    rows = []
    for name, by_batch in s.profiles.items():
        first = next(iter(by_batch.values()))
        macs = sum(r["macs"] for r in first.layers) or 1
        for b, prof in by_batch.items():
            total = sum(r["ms"] for r in prof.layers) or 1
            rows += [{"model": name, "layer": r["layer"], "kind": r["kind"], "measure": f"time, batch {b}",
                      "share (%)": 100 * r["ms"] / total} for r in prof.layers]
        rows += [{"model": name, "layer": r["layer"], "kind": r["kind"], "measure": "MACs", "share (%)": 100 * r["macs"] / macs}
                 for r in first.layers]
    return pd.DataFrame(rows)


def why(s: Summary, df: pd.DataFrame) -> str:
    """What the profiles say, in sentences computed from them: the share of the forward outside the convolutions
    at each batch size, and the models whose measured speed-up falls furthest below their MAC reduction."""
    check = profile_check(s)
    if check.empty:
        return "No model was profiled (`profile_groups` is empty)."
    lines = []
    for b, part in check.groupby("batch size", sort=False):
        lines.append(f"At batch {b}, convolutions and the linear layer take {part['conv + linear share (%)'].median():.0f}% "
                     f"of the forward (median over {len(part)} models; framework overhead "
                     f"{part['framework overhead share (%)'].median():.0f}%)")
    sp = speedups(s, df)
    col = next(c for c in sp.columns if c.startswith("speed-up at batch") and _batch(s.throughput_col) in c)
    gap = (sp[col] / sp["MAC reduction (×)"]).iloc[1:]
    worst = gap.idxmin() if len(gap) else None
    text = ". ".join(lines) + "."
    if worst is not None:
        text += (f" Furthest below its MAC reduction at batch {_batch(s.throughput_col)}: {worst} "
                 f"({sp.loc[worst, col]:.2f}× measured for {sp.loc[worst, 'MAC reduction (×)']:.2f}× fewer MACs).")
    return text + (" The profiled totals lie within "
                   f"{100 * (check['profiled ÷ measured'] - 1).abs().max():.0f}% of the latencies measured without the profiler.")


def seeds_table(s: Summary) -> pd.DataFrame:
    """Each recipe with two or more seeds in the store, over its seeds (`results.seeds_table`)."""
    return results.seeds_table(_rows(s), s.verdicts)


def fastest(s: Summary, df: pd.DataFrame) -> pd.DataFrame:
    """Per model: its throughput (measure batch) and latency (latency batch) in the faster of the engines it was
    timed in (eager PyTorch; ONNX Runtime when exported), and which engine that is."""
    engines = [(PYTORCH, s.throughput_col, s.latency_col)] + (
        [(ORT, s.ort_throughput_col, s.ort_latency_col)] if s.ort_latency_col else [])
    thr = pd.DataFrame({e: df[t] for e, t, _ in engines})
    lat = pd.DataFrame({e: df[l] for e, _, l in engines})
    return pd.DataFrame({"throughput": thr.max(axis=1), "throughput engine": thr.idxmax(axis=1),
                         "latency": lat.min(axis=1), "latency engine": lat.idxmin(axis=1)}, index=df.index)


def main_table(s: Summary, df: pd.DataFrame) -> pd.DataFrame:
    """06's table that fits a screen (the rest of each row is in `table`, shown folded below it): accuracy with its
    interval, Δ with both verdicts, the course score, the file size, and each speed-up over the eager PyTorch
    baseline timed in the same rounds (median, lowest–highest over the rounds), in the model's faster engine."""
    fast, ref = fastest(s, df), s.timed[df.index[0]]
    short = {PYTORCH: "PyTorch", ORT: "ORT"}

    def up(name: str, kind: str) -> str:
        engine = fast.loc[name, f"{kind} engine"]
        ratio = metrics.speedup(s.timings[engine, s.timed[name], kind], s.timings[PYTORCH, ref, kind])
        return f"{metrics.spread_text(ratio)} {short.get(engine, engine)}"

    return pd.DataFrame({
        "test accuracy (%, 95% interval)": [f"{a:.2f} ({ci})" for a, ci in zip(df[ACC], df[ACC_CI])],
        "Δ (pt)": df[DELTA], "verdict, these images": df[steps.IMAGES], "verdict, recipe over seeds": df[steps.RECIPE],
        "course score": df["course score"], "size (KB)": df[SIZE],
        f"speed-up, batch {_batch(s.throughput_col)}": [up(n, "throughput") for n in df.index],
        f"speed-up, batch {_batch(s.latency_col)}": [up(n, "latency") for n in df.index]}, index=df.index)


def answers(s: Summary, df: pd.DataFrame, max_drop: float) -> list[dict[str, Any]]:
    """The best model per criterion among those that compete on cost (`competing`: within `max_drop` of their
    baseline and not found worse), each with its value, how it compares with the baseline (a speed: the ratio to
    the eager PyTorch baseline timed in the same rounds, with its spread over them, in the model's faster engine),
    its accuracy cost with the verdict it rests on, and the best model of another recipe (a replicate of the winner
    is the same recipe). What 06's answer box and the index's line both say, from the same filter."""
    close, ref = competing(df, max_drop), df.iloc[0]
    fast = fastest(s, df)
    table = close.assign(**{"throughput": fast["throughput"], "latency": fast["latency"]})
    out = []
    for criterion, col, higher, fmt in (
            ("lowest course score", "course score", False, "{:.4f}"), ("smallest file", SIZE, False, "{:,.0f} KB"),
            (f"highest throughput at batch {_batch(s.throughput_col)}", "throughput", True, "{:,.0f} img/s"),
            (f"lowest latency at batch {_batch(s.latency_col)}", "latency", False, "{:.2f} ms")):
        pool = table.dropna(subset=[col])
        pool = pool[[s.timed.get(n, n) == n for n in pool.index]]  # a recipe by its model from the reference seed
        if pool.empty:
            continue
        win = pool[col].idxmax() if higher else pool[col].idxmin()
        engine = fast.loc[win, f"{col} engine"] if col in ("throughput", "latency") else None
        if engine:
            up = metrics.speedup(s.timings[engine, s.timed[win], col], s.timings[PYTORCH, s.timed[df.index[0]], col])
            compared = f"{metrics.spread_text(up)} the eager PyTorch baseline, in {engine}"
        else:
            compared = f"{ref[col] / pool.loc[win, col]:.2f}× {'smaller' if col == SIZE else 'lower'}"
        others = pool.drop(index=win)
        second = (others[col].idxmax() if higher else others[col].idxmin()) if len(others) else None
        out.append({"criterion": criterion, "model": win, "value": fmt.format(pool.loc[win, col]), "compared": compared,
                    "delta": df.loc[win, DELTA], "verdict": _verdict(df, win) if VERDICT in df else "not judged",
                    "runner-up": second, "runner-up value": fmt.format(pool.loc[second, col]) if second else None})
    return out


def answer(s: Summary, df: pd.DataFrame, max_drop: float, target: float) -> str:
    """06's first words (Markdown, computed): the baseline with its interval and spread over seeds; the best
    model per criterion among those that compete on cost (`answers`), with its accuracy cost, verdict and
    runner-up; whether a model is detectably more accurate; how many are worse; the course target."""
    ref, b = df.iloc[0], s.verdicts.spread
    seeds = f"{b.mean:.2f} ± {b.sd:.2f}% over its {b.n} training seeds" if b.n > 1 else "one training seed"
    best = [f"- {a['criterion']}: **{a['model']}**, {a['value']} ({a['compared']}), {a['delta']:+.2f} pt "
            f"({a['verdict']})" + (f"; next recipe: {a['runner-up']} ({a['runner-up value']})" if a["runner-up"] else "")
            for a in answers(s, df, max_drop)]
    sentence = most_accurate(df)
    return "\n".join([
        f"**Baseline**: {ref[ACC]:.2f}% test accuracy (95% interval {ref[ACC_CI]}%; {seeds}).", "",
        f"**Best per criterion** among the {len(competing(df, max_drop))} of {len(df)} models within {max_drop:g} pt "
        "of their baseline and not found worse (`max_drop`; a verdict from *these images* is the paired test on the "
        "test images, one from a *recipe* is over training seeds):", "", *best,
        f"- accuracy: {sentence}." if sentence else "- accuracy: not judged.", "",
        f"**Worse than their baseline**: {_worse(df)}.  ", f"**Course target**: {course_target(s, df, target)}"])


def headline(s: Summary, df: pd.DataFrame, max_drop: float) -> str:
    """The index's line: the baseline, then the answer box's winners (`answers`) with the same filter, stated."""
    b = s.verdicts.spread
    spread = f" ({b.mean:.1f} ± {b.sd:.1f}% over {b.n} training seeds)" if b.n > 1 else " (one seed)"
    bad = unusable(s)
    best = "; ".join(f"{a['criterion']} {a['model']} ({a['value']}, {a['compared']}, {a['delta']:+.2f} pt: "
                     f"{a['verdict']})" for a in answers(s, df, max_drop))
    return (f"{len(df)} models re-measured side by side; baseline {df.iloc[0][ACC]:.1f}%{spread}. Within {max_drop:g} pt "
            f"of their baseline and not found worse: {best}; {_worse(df)}; {most_accurate(df)}"
            + (f"; {len(bad)} unusable runs listed" if bad else ""))


def _verdict(df: pd.DataFrame, name: str) -> str:
    return steps.verdict_text(df.loc[name])


def _worse(df: pd.DataFrame) -> str:
    """How many models are worse than their baseline, by the verdict each rests on, in words."""
    if VERDICT not in df:
        return "not judged"
    worse = df[df[VERDICT] == stats.WORSE]
    by_recipe = int(worse[BASIS].str.startswith("recipe").sum()) if BASIS in df else 0
    return (f"{len(worse)} model(s) worse than their baseline ({by_recipe} as a recipe over seeds, "
            f"{len(worse) - by_recipe} on these test images only)")

