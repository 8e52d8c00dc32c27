"""Figures for the reports (seaborn on matplotlib): every one titled, with labelled axes and units."""
from __future__ import annotations

import html

from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter
import pandas as pd
import seaborn as sns
import torch

from . import stats

sns.set_theme(style="whitegrid", context="notebook")


def wilson_err(acc: Sequence[float], n: int) -> list[list[float]]:
    """Asymmetric error bars (below, above) of accuracies (%) measured on `n` images: their 95% Wilson intervals."""
    ci = [stats.wilson(round(a * n / 100), n) for a in acc]
    return [[a - lo for a, (lo, _) in zip(acc, ci)], [hi - a for a, (_, hi) in zip(acc, ci)]]


def _wilson_band(ax: plt.Axes, x: Sequence[float], acc: Sequence[float], n: int, color) -> None:
    """The 95% Wilson interval of an accuracy curve as a shaded band."""
    lo, hi = zip(*[stats.wilson(round(a * n / 100), n) for a in acc])
    ax.fill_between(list(x), lo, hi, color=color, alpha=0.15, linewidth=0)


def training_curves(history: Sequence[dict], title: str = "Training curves", n: dict[str, int] | None = None) -> plt.Figure:
    """Loss, accuracy and learning rate per epoch for the train / val / test splits; with `n` (images per split),
    each held-out accuracy curve carries its 95% Wilson band."""
    df = pd.DataFrame(history)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy (%)")):
        splits = [s for s in ("train", "val", "test") if f"{s}_{metric}" in df]
        long = df.melt(id_vars="epoch", value_vars=[f"{s}_{metric}" for s in splits], var_name="split", value_name=metric)
        long["split"] = long["split"].str.replace(f"_{metric}", "")
        sns.lineplot(data=long, x="epoch", y=metric, hue="split", marker="o", ax=ax)
        if metric == "acc" and n:
            for split, color in zip(splits, sns.color_palette(n_colors=len(splits))):
                if split in n and n[split]:
                    _wilson_band(ax, df["epoch"], df[f"{split}_acc"], n[split], color)
        ax.set(title=f"{label.split(' (')[0].capitalize()} per epoch" + (" (bands: 95% intervals)" if metric == "acc" and n else ""),
               xlabel="epoch", ylabel=label)
    sns.lineplot(data=df, x="epoch", y="lr", marker="o", ax=axes[2], color="tab:gray")
    axes[2].set(title="Learning rate at the end of each epoch", xlabel="epoch", ylabel="learning rate")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion(cm: torch.Tensor, classes: Sequence[str], title: str = "Confusion matrix (test set)") -> plt.Figure:
    """Rows: true class; columns: predicted class; cells: share of the true class (%)."""
    counts = cm.double()
    share = 100 * counts / counts.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(8, 6.5))
    sns.heatmap(share.numpy(), annot=True, fmt=".0f", cmap="Blues", xticklabels=classes, yticklabels=classes,
                cbar_kws={"label": "share of the true class (%)"}, ax=ax)
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    fig.tight_layout()
    return fig


def per_class_accuracy(cm: torch.Tensor, classes: Sequence[str], title: str = "Accuracy per class (test set)") -> plt.Figure:
    acc = (100 * cm.diag().double() / cm.sum(1).double().clamp(min=1)).numpy()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    sns.barplot(x=list(classes), y=acc, hue=list(classes), palette="viridis", legend=False, ax=ax)
    overall = 100 * cm.diag().sum().item() / max(cm.sum().item(), 1)
    ax.axhline(overall, color="black", linestyle="--", label=f"overall {overall:.1f}%")
    ax.set(title=title, xlabel="class", ylabel="accuracy (%)", ylim=(0, 100))
    ax.legend(loc="lower right")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def sample_predictions(images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, classes: Sequence[str],
                       n: int = 24, cols: int = 8, title: str = "Sample test predictions") -> plt.Figure:
    """uint8 NCHW images with 'predicted (true)' captions; wrong predictions in red."""
    n = min(n, len(images))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.9), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i].permute(1, 2, 0).numpy())
        ok = preds[i] == labels[i]
        ax.set_title(f"{classes[preds[i]]}\n({classes[labels[i]]})", fontsize=8, color="darkgreen" if ok else "red")
    fig.suptitle(f"{title}: predicted (true); red = wrong")
    fig.tight_layout()
    return fig


def metrics_table(m: dict, n_test: int | None = None, n_val: int | None = None) -> pd.DataFrame:
    """A two-column table (metric, value) with units, for the report; with the split sizes, each accuracy
    with its 95% Wilson interval."""
    def acc(value, n):
        if value is None:
            return "–"
        if not n:
            return f"{value:.2f}"
        return f"{value:.2f} (95%: {stats.interval_text(*stats.wilson(round(value * n / 100), n))}, {n:,} images)"

    rows = [
        ("test accuracy (%)", acc(m["test_acc"], n_test)),
        ("validation accuracy (%)", acc(m.get("val_acc"), n_val)),
        ("test loss", f"{m['test_loss']:.4f}"),
        ("parameters", f"{m['params']:,}"),
        ("nonzero parameters", f"{m['nonzero_params']:,}"),
        ("MACs per image (conv + linear)", f"{m['macs']:,}"),
        ("size on disk (MB)", f"{m['size_bytes'] / 1e6:.2f}"),
        (f"CPU throughput at batch {m['batch_size']} (img/s)", f"{m['throughput_img_s']:.0f}"),
        (f"CPU latency at batch {m['batch_size']} (ms)", f"{m['latency_ms']:.1f}"),
        ("training time (s, excluding per-epoch evaluation)", f"{m['train_time_s']:.0f}"),
        ("training + evaluation time (s)", f"{m['train_and_eval_time_s']:.0f}"),
        ("training device", m["train_device"]),
    ]
    return pd.DataFrame(rows, columns=["metric", "value"]).set_index("metric")


def seed_table(reps: Sequence, n_test: int, n_val: int) -> pd.DataFrame:
    """The baseline over its training seeds (`train.replicates`): each run's test accuracy with its 95% Wilson
    interval and its validation accuracy, then their mean ± sd over the seeds."""
    rows = []
    for r in reps:
        m = r.metrics
        lo, hi = stats.wilson(round(m["test_acc"] * n_test / 100), n_test)
        rows.append({"training seed": str(r.run.params.get("train_seed", r.run.params["seed"])),
                     "test accuracy (%)": m["test_acc"], "test 95% interval (%)": stats.interval_text(lo, hi),
                     "validation accuracy (%)": m.get("val_acc"), "training time (s)": m["train_time_s"],
                     "run": str(r.run)})
    df = pd.DataFrame(rows)
    if len(rows) > 1:
        t, v = stats.spread(df["test accuracy (%)"]), stats.spread(df["validation accuracy (%)"].dropna())
        df.loc[len(df)] = {"training seed": f"mean ± sd ({t.n} seeds)", "test accuracy (%)": t.mean,
                           "test 95% interval (%)": f"sd {t.sd:.2f}; mean {stats.interval_text(t.low, t.high)}",
                           "validation accuracy (%)": v.mean, "training time (s)": df["training time (s)"].mean(),
                           "run": ""}
    return df.set_index("training seed")


def seed_spread(reps: Sequence, n_test: int, title: str = "Baseline over training seeds") -> plt.Figure:
    """Each seed's test accuracy with its 95% Wilson interval (the test sample's noise), and the mean ± sd over the
    seeds (the training seed's noise) as a band."""
    accs = [r.metrics["test_acc"] for r in reps]
    seeds = [str(r.run.params.get("train_seed", r.run.params["seed"])) for r in reps]
    ci = [stats.wilson(round(a * n_test / 100), n_test) for a in accs]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.errorbar(seeds, accs, yerr=[[a - lo for a, (lo, _) in zip(accs, ci)], [hi - a for a, (_, hi) in zip(accs, ci)]],
                fmt="o", capsize=4, label="test accuracy, 95% interval (test sample)")
    if len(accs) > 1:
        s = stats.spread(accs)
        ax.axhspan(s.mean - s.sd, s.mean + s.sd, color="tab:orange", alpha=0.2, label=f"mean ± sd over seeds ({s.sd:.2f} pt)")
        ax.axhline(s.mean, color="tab:orange", lw=1)
    ax.set(title=title, xlabel="training seed", ylabel="test accuracy (%)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def epoch_curves(histories: dict[str, Sequence[dict]], title: str, n: dict[str, int] | None = None) -> plt.Figure:
    """Train (dashed) and validation (solid) loss and accuracy per epoch, one colour per model (the test split
    where a history has no validation figures); with `n` (images per split: `val`, `test`), each held-out accuracy
    curve carries its 95% Wilson band."""
    rows = []
    for name, history in histories.items():
        for r in history:
            held_out = "val" if "val_acc" in r else "test"
            rows += [{"model": name, "epoch": r["epoch"], "split": {"val": "validation"}.get(split, split),
                      "loss": r[f"{split}_loss"], "acc": r[f"{split}_acc"]}
                     for split in ("train", held_out) if f"{split}_acc" in r]
    df = pd.DataFrame(rows)
    held = [s for s in ("validation", "test") if s in set(df["split"])]
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.8))
    for ax, metric, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy (%)")):
        sns.lineplot(data=df, x="epoch", y=metric, hue="model", style="split", style_order=held + ["train"],
                     markers=True, ax=ax)
        banded = metric == "acc" and bool(n)
        if banded:
            for model, color in zip(df["model"].unique(), sns.color_palette(n_colors=df["model"].nunique())):
                for split in held:
                    size = (n or {}).get({"validation": "val"}.get(split, split))
                    part = df[(df["model"] == model) & (df["split"] == split)]
                    if size and len(part):
                        _wilson_band(ax, part["epoch"], part["acc"], size, color)
        ax.set(title=f"{label.split(' (')[0].capitalize()} per epoch" + (" (bands: 95% intervals)" if banded else ""),
               xlabel="epoch", ylabel=label)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def tradeoff(df: pd.DataFrame, x: str, y: str, title: str, xlabel: str, ylabel: str, label: str = "method",
             logx: bool = False, reference: float | None = None, reference_label: str = "",
             acc: str | None = None, n: int | None = None) -> plt.Figure:
    """One point per row of `df` (colour and marker name it in the legend): a trade-off such as accuracy vs size.
    `acc` (the column `x` or `y` that is an accuracy measured on `n` images) gets 95% Wilson error bars."""
    fig, ax = plt.subplots(figsize=(11, 5.5))
    if acc and n:
        err = wilson_err(df[acc], n)
        ax.errorbar(df[x], df[y], **({"yerr": err} if acc == y else {"xerr": err}), fmt="none", ecolor="gray",
                    alpha=0.6, capsize=3, zorder=1)
        title += " (bars: 95% intervals)"
    sns.scatterplot(data=df, x=x, y=y, hue=label, style=label, s=130, ax=ax, zorder=2)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label=reference_label)
    if logx:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.margins(x=0.1, y=0.1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=9, title=label)
    fig.tight_layout()
    return fig


def show_table(df: pd.DataFrame, formats: dict | None = None):
    """A table for the report: thousands separators, two decimals unless `formats` gives a column its own
    format (a format string such as "{:.4f}" or a function); a missing value is left blank (the baseline's own
    p-value); text columns read left-aligned. Every cell, index label and header is HTML-escaped: model names,
    reasons and paths come from run files that people share. The index column stays in view when the table
    scrolls sideways. A pandas Styler, which renders as HTML."""
    style = df.style.format(precision=2, thousands=",", na_rep="", escape="html")
    style = style.format_index(escape="html", axis=0).format_index(escape="html", axis=1)
    for col, fmt in (formats or {}).items():
        if col in df.columns:  # a column a table may lack (a seeds table of baselines only has no p-values)
            style = style.format(fmt, subset=[col], na_rep="", escape="html")
    text = [c for c in df.columns if df[c].dtype == object]
    style = style.set_sticky(axis="index")  # the model's name stays in view while a wide table scrolls
    return style.set_properties(subset=text, **{"text-align": "left"}) if text else style


def folded(table, title: str):
    """A table (`show_table`'s Styler, its cells escaped) folded under a one-line title the reader opens."""
    from IPython.display import HTML

    return HTML(f"<details><summary>{html.escape(title)}</summary>{table.to_html()}</details>")


def number(v: float) -> str:
    """A figure of any size, readable: thousands separators from 10,000 up, else 4 significant digits."""
    return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"


def pareto(df: pd.DataFrame, x: str, y: str, front: pd.Series, hue: str, title: str, xlabel: str, ylabel: str,
           reference: str | None = None, floor: float | None = None, yerr: pd.DataFrame | None = None,
           threshold: float | None = None) -> plt.Figure:
    """Every model as a point (colour and marker: `hue`), the models on the Pareto front joined by a step line
    and named; dotted lines through the `reference` row (an index label) split the plane into better and
    worse, and a dashed line at `threshold` on y marks the accuracy a model must keep to compete (06's
    `max_drop` below the baseline). The x axis is logarithmic when the costs span more than 10×. Models below `floor` on y are
    left out of the plot area and named in a note, so that they do not squash the rest. `yerr` (columns `low`,
    `high`, indexed like `df`) draws each point's interval on y as an error bar."""
    fig, ax = plt.subplots(figsize=(12, 6.5))
    shown = df if floor is None else df[df[y] >= floor]
    if yerr is not None:
        bars = yerr.loc[shown.index]
        ax.errorbar(shown[x], shown[y], yerr=[shown[y] - bars["low"], bars["high"] - shown[y]], fmt="none",
                    ecolor="darkgray", elinewidth=1, capsize=3, zorder=1, label="95% interval (test set)")
    sns.scatterplot(data=shown.reset_index(), x=x, y=y, hue=hue, style=hue, s=120, ax=ax, zorder=3)
    on_front = shown[front.loc[shown.index]].sort_values(x)
    ax.step(on_front[x], on_front[y], where="post", color="black", linewidth=1.2, linestyle="--", zorder=2,
            label="Pareto front")
    if reference is not None:
        ax.axvline(df.loc[reference, x], color="gray", linestyle=":", linewidth=1.2, label=reference)
        ax.axhline(df.loc[reference, y], color="gray", linestyle=":", linewidth=1.2)
    if threshold is not None:
        ax.axhline(threshold, color="firebrick", linestyle="--", linewidth=1, label=f"competes above ({threshold:.1f})")
    if df[x].max() > 10 * df[x].min():
        ax.set_xscale("log")
        xlabel += " (log scale)"
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: number(v)))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    hidden = df.index.difference(shown.index)
    if len(hidden):
        ax.text(0.01, 0.01, "below the plot: " + "; ".join(f"{n} ({df.loc[n, y]:.1f})" for n in hidden),
                transform=ax.transAxes, fontsize=8.5, color="dimgray")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.margins(x=0.15, y=0.1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=9)
    fig.tight_layout()
    _name_points(ax, on_front, x, y)
    return fig


def _name_points(ax: plt.Axes, points: pd.DataFrame, x: str, y: str) -> None:
    """Write each point's index label beside it, at the first of a few offsets where it overlaps no earlier
    label and stays inside the axes."""
    renderer = ax.figure.canvas.get_renderer()
    inside, taken = ax.get_window_extent(renderer), []
    offsets = [(8, 6, "left"), (8, -14, "left"), (-8, 6, "right"), (-8, -14, "right"), (8, 18, "left"), (8, -26, "left")]
    for name, row in points.iterrows():
        for dx, dy, ha in offsets:
            label = ax.annotate(name, (row[x], row[y]), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=8.5)
            box = label.get_window_extent(renderer)
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
            if fits and not any(box.overlaps(other) for other in taken):
                break
            label.remove()
        else:  # nowhere free: the first place
            label = ax.annotate(name, (row[x], row[y]), textcoords="offset points", xytext=offsets[0][:2], fontsize=8.5)
            box = label.get_window_extent(renderer)
        taken.append(box)


def bars(df: pd.DataFrame, x: str, y: str, title: str, ylabel: str) -> plt.Figure:
    """One bar per row, e.g. training time per model."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    sns.barplot(data=df, x=x, y=y, hue=x, legend=False, palette="viridis", ax=ax)
    ax.set(title=title, xlabel=x, ylabel=ylabel)
    ax.tick_params(axis="x", rotation=20)
    for container in ax.containers:
        ax.bar_label(container, fmt="%.0f", fontsize=8)
    fig.tight_layout()
    return fig


def lines(df: pd.DataFrame, x: str, y: str, hue: str, title: str, xlabel: str, ylabel: str, style: str | None = None,
          logx: bool = False, reference: float | None = None, reference_label: str = "", n: int | None = None) -> plt.Figure:
    """One line per `hue` value (and dash pattern per `style`), markers at the measured points; with `n`, `y` is an
    accuracy measured on `n` images and each point gets its 95% Wilson error bar."""
    fig, ax = plt.subplots(figsize=(11, 5.5))
    if n:
        ax.errorbar(df[x], df[y], yerr=wilson_err(df[y], n), fmt="none", ecolor="gray", alpha=0.5, capsize=3, zorder=1)
        title += " (bars: 95% intervals)"
    sns.lineplot(data=df.sort_values(x), x=x, y=y, hue=hue, style=style, markers=True, markersize=9, ax=ax)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle=":", label=reference_label)
    if logx:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=9)
    fig.tight_layout()
    return fig


def heatmap(df: pd.DataFrame, title: str, xlabel: str, ylabel: str, colorbar: str, fmt: str = ".1f",
            cmap: str = "rocket_r") -> plt.Figure:
    """Rows × columns of `df` as coloured, annotated cells (e.g. layer × amount)."""
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(df.columns), 1.2 + 0.38 * len(df)))
    sns.heatmap(df, annot=True, fmt=fmt, cmap=cmap, cbar_kws={"label": colorbar}, ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.tight_layout()
    return fig


def grouped_bars(df: pd.DataFrame, x: str, y: str, hue: str, title: str, xlabel: str, ylabel: str) -> plt.Figure:
    """Bars of `y` per `x`, one colour per `hue` (e.g. sparsity per layer, per model)."""
    fig, ax = plt.subplots(figsize=(16, 5.5))
    sns.barplot(data=df, x=x, y=y, hue=hue, ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.tick_params(axis="x", rotation=60)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, title=hue)
    fig.tight_layout()
    return fig


def speedup_vs_macs(df: pd.DataFrame, hue: str = "group") -> plt.Figure:
    """Measured speed-up against the speed-up the MAC count predicts, one panel per measured column (`speed-up
    at batch …`), each point numbered by its row of `df` (the table below it names them); points under the y = x
    line are slower than their MACs promise."""
    measured = [c for c in df.columns if c.startswith("speed-up at batch")]
    fig, axes = plt.subplots(1, len(measured), figsize=(7 * len(measured), 5.5), squeeze=False)
    x = "MAC reduction (×)"
    top = max(df[x].max(), *(df[c].max() for c in measured)) * 1.1
    for ax, col in zip(axes[0], measured):
        ax.plot([0, top], [0, top], color="gray", linestyle="--", lw=1, label="y = x (speed-up = MAC reduction)")
        sns.scatterplot(data=df, x=x, y=col, hue=hue, style=hue, s=90, ax=ax)
        for i, (_, row) in enumerate(df.iterrows()):
            ax.annotate(str(i), (row[x], row[col]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set(xlim=(0, top), ylim=(0, top), title=f"Measured vs predicted: {col.removeprefix('speed-up at ').removesuffix(' (×)')}",
               xlabel="predicted speed-up: MAC reduction (× fewer MACs than the baseline)",
               ylabel=f"measured speed-up over the baseline (×, {col.removeprefix('speed-up at ').removesuffix(' (×)')})")
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def time_breakdown(long: pd.DataFrame, measured: pd.DataFrame, kinds: Sequence[str]) -> plt.Figure:
    """Per model, a stacked bar of where its CPU time goes (`kinds` in order), one panel per batch size; a black
    tick marks the latency measured without the profiler in the same rounds."""
    batches = list(dict.fromkeys(long["batch size"]))
    models = list(dict.fromkeys(long["model"]))
    colors = dict(zip(kinds, sns.color_palette("tab10", n_colors=len(kinds))))
    fig, axes = plt.subplots(1, len(batches), figsize=(9 * len(batches), 1.6 + 0.42 * len(models)), squeeze=False)
    for ax, b in zip(axes[0], batches):
        part = long[long["batch size"] == b].pivot(index="model", columns="kind", values="ms per batch").reindex(models)
        left = pd.Series(0.0, index=models)
        for kind in kinds:
            if kind in part and part[kind].abs().sum() > 0:
                ax.barh(models, part[kind], left=left, color=colors[kind], label=kind)
                left += part[kind]
        m = measured[measured["batch size"] == b].set_index("model").reindex(models)
        ax.scatter(m["measured latency (ms)"], models, marker="|", s=300, color="black", label="measured (no profiler)", zorder=3)
        ax.invert_yaxis()
        ax.set(title=f"Where the CPU time goes, batch {b} (torch.profiler)", xlabel=f"ms per batch of {b}", ylabel="")
        ax.tick_params(axis="y", labelsize=8)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    for ax in axes[0][1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    return fig


def layer_shares(long: pd.DataFrame, ncols: int = 2) -> plt.Figure:
    """One panel per model: each conv/linear layer's share of the MACs next to its share of the measured conv +
    linear time at each batch size; a layer whose time share exceeds its MAC share runs below the model's average
    efficiency."""
    import math

    models = list(dict.fromkeys(long["model"]))
    measures = list(dict.fromkeys(long["measure"]))
    colors = dict(zip(measures, sns.color_palette(n_colors=len(measures))))
    nrows = math.ceil(len(models) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(9 * ncols, 2.9 * nrows), squeeze=False)
    width = 0.8 / len(measures)
    for ax, model in zip(axes.flat, models):
        part = long[long["model"] == model]
        layers = list(dict.fromkeys(part["layer"]))
        for i, measure in enumerate(measures):
            rows = part[part["measure"] == measure].set_index("layer").reindex(layers)
            ax.bar([j + (i - (len(measures) - 1) / 2) * width for j in range(len(layers))], rows["share (%)"],
                   width=width, color=colors[measure], label=measure)
        ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=6)
        ax.set_title(model, fontsize=9)
        ax.set_ylabel("share (%)", fontsize=8)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="upper center", ncol=len(measures), fontsize=9,
               bbox_to_anchor=(0.5, 1.0))
    fig.suptitle("Each conv / linear layer (in forward order): its share of the model's MACs vs its share of the "
                 "measured conv + linear time", y=1.0 + 0.25 / nrows)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / nrows))
    return fig


def engines(long: pd.DataFrame) -> plt.Figure:
    """Per model, its speed-up over the eager PyTorch baseline in each engine, one panel per measure (latency
    batch, throughput batch; log scale, 1× dotted). `long` is `summary.engine_speedups`'s."""
    n = long["model"].nunique()
    fig, axes = plt.subplots(1, 2, figsize=(16, 1.6 + 0.38 * n), sharey=True, squeeze=False)
    for ax, (measure, part) in zip(axes[0], long.groupby("measure", sort=False)):
        sns.barplot(data=part, y="model", x="speed-up (×)", hue="engine", ax=ax, orient="h")
        ax.axvline(1, color="gray", linestyle=":", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.set(title=f"Speed-up over the eager PyTorch baseline\n{measure}", ylabel="",
               xlabel="× the eager PyTorch baseline (log scale; higher is faster)")
        ax.tick_params(axis="y", labelsize=8)
        ax.legend(title="engine", loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
