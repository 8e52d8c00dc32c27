"""End to end: the notebook through papermill (the README's command) and `make report`'s pipeline."""
import base64
import io
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
import yaml
from PIL import Image

from resnet_lab import report

from conftest import ROOT

pytestmark = pytest.mark.slow


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_papermill_command_from_the_repo_root(tmp_path, baseline_store):
    # the README's command on a store holding the smoke baseline's runs: the notebook reads them back (the report
    # build below trains them through the notebook)
    out = tmp_path / "out.ipynb"
    cmd = ["papermill", "notebooks/01_baseline.ipynb", str(out), "-f", "params/smoke.yaml",
           "-p", "run_root", str(baseline_store), "-p", "progress", "False"]
    r = subprocess.run([str(ROOT / ".venv/bin" / cmd[0]), *cmd[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    outputs = _outputs(nbformat.read(out, as_version=4))
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 5  # curves, seed spread, per-class accuracy, confusion matrix, samples; none shown twice
    assert any(report.HEADLINE_KEY in o.get("metadata", {}) for o in outputs)


def test_report_builds_index_and_html_then_reuses_everything(smoke_report, capsys, monkeypatch, tmp_path):
    # smoke_report (conftest.py): every smoke report, each built once per test run, into a fresh run store
    out, overrides = smoke_report
    index = (out / "index.html").read_text()
    assert "href='01_baseline.html'" in index and "test accuracy" in index
    html = (out / "01_baseline.html").read_text()
    assert html.count("<img") >= 4 and "Traceback" not in html
    assert "trained now into" in html
    # the parameters that ran (papermill's injected cell) are shown; the defaults cell is not
    code = report.code_page(out / "01_baseline.html").read_text()
    assert "# Parameters</span>" in code and "papermill overrides them" not in code
    assert "Parameters that ran" in html and "papermill overrides them" not in html
    for notebook in sorted(out.glob("0*.ipynb")):
        # every section that builds a table or figure shows it (06's "Does each technique beat the baseline?" did
        # not at 36ae41b); a reader's page shows no code and no warnings, its code page both
        assert report.silent_sections(notebook) == [], notebook.name
        page, full = (out / f"{notebook.stem}.html").read_text(), report.code_page(out / f"{notebook.stem}.html").read_text()
        assert "hl-ipython3" not in page and "hl-ipython3" in full, notebook.name  # a code input's highlighting
        assert 'data-mime-type="application/vnd.jupyter.stderr"' not in page, notebook.name  # (its CSS names it)
        assert str(ROOT) not in page, notebook.name  # a path inside the repository is shown relative to it
    optuna_html = (out / "02_optuna.html").read_text()
    assert optuna_html.count("<img") >= 6 and "Traceback" not in optuna_html  # five Optuna plots + curves
    for text in ('id="Optimization-history"', 'id="Hyperparameter-importances"', 'id="Parallel-coordinates"',
                 'id="Contour"', 'id="Slice"', "COMPLETE", "Retrained", "test "):
        assert text in optuna_html, text
    assert "href='02_optuna.html'" in index and "retrained test accuracy" in index
    quant_html = (out / "03_quantization.html").read_text()
    assert quant_html.count("<img") >= 3 and "Traceback" not in quant_html  # BC curves, two trade-offs
    for text in ("FP16", "INT8 (x86", "BinaryConnect (deterministic, inner layers)", "Δ vs parent (pt)",
                 "speed-up over rounds (×)", "course score", "rebuilt model gives identical logits"):
        assert text in quant_html, text
    assert "href='03_quantization.html'" in index and "BinaryConnect" in index
    prune_html = (out / "04_pruning.html").read_text()
    assert prune_html.count("<img") >= 6 and "Traceback" not in prune_html  # curves ×2, throughput, layers, heat map, epochs
    for text in ("L1 unstructured, global, 50%", "L1 structured, layer, 50% of channels", "Sensitivity analysis",
                 "MicroNet score", "p_s", "speed-up ÷ MAC reduction", "→ FP16", "→ BinaryConnect (deterministic"):
        assert text in prune_html, text
    assert "href='04_pruning.html'" in index and "lowest course score within 2 pt and not found worse" in index
    svd_html = (out / "05_svd.html").read_text()
    assert svd_html.count("<img") >= 6 and "Traceback" not in svd_html  # the six figures + throughput vs MACs
    for text in ("SVD 0.25 of full rank (from scratch)", "speed-up ÷ MAC reduction"):
        assert text in svd_html, text
    # a figure's title is drawn in its image; its call is on the page with code
    assert "Memory footprint vs parameters" in report.code_page(out / "05_svd.html").read_text()
    assert "href='05_svd.html'" in index and "fewer parameters" in index
    summary_html = (out / "06_summary.html").read_text()
    # 5 Pareto fronts (one of ONNX Runtime latency), the two engines, speed-ups, time, layers
    assert summary_html.count("<img") == 9 and "Traceback" not in summary_html
    summary_code = report.code_page(out / "06_summary.html").read_text()
    assert summary_html.index("The answer") < summary_html.index("Side by side")  # the answer first
    for text in ("Best per criterion", "lowest course score", "smallest file", "highest throughput at batch",
                 "Test accuracy vs size on disk", "Test accuracy vs MACs", "Test accuracy vs measured CPU latency",
                 "Test accuracy vs course score", "Does each technique beat the baseline?", "The best model per criterion",
                 "not judged here", "Every run in the store", "FP16", "L1 structured, layer, 50% of channels",
                 "combination", "L1 unstructured, global, 50% → FP16",
                 "SVD 0.25 of full rank (from scratch)", "Deployed: ONNX Runtime beside eager PyTorch",
                 "Test accuracy vs ONNX Runtime latency", "quantized (QDQ)"):
        assert text in summary_html + summary_code, text  # a figure title is in its call, on the code page
    assert "%, recomputed " not in summary_html  # every saved model reproduces the accuracy its run stored
    assert "href='06_summary.html'" in index and "models re-measured side by side" in index

    # nothing changed: no notebook runs again
    capsys.readouterr()
    pages = {p: p.stat().st_mtime_ns for p in out.glob("0*.html")}
    assert report.build("smoke", out, overrides=overrides) == 0
    printed = capsys.readouterr().out
    assert printed.count(": up to date (built in") == len(report.plan("smoke")), printed
    assert "06_summary 0 s (up to date); total 0 s" in printed
    assert {p: p.stat().st_mtime_ns for p in out.glob("0*.html")} == pages
    # forced: executed again, the finished runs reused
    assert report.build("smoke", out, only=["01_baseline"], overrides=overrides, force=True) == 0
    assert "reused from" in (out / "01_baseline.html").read_text()
    # a run of 04 changed: 04 and 06, which read it, run again; the others stay up to date. What is checked here is
    # which notebooks the build runs, so papermill's part is the report each executed before (with its reads)
    import papermill

    executed = {name: shutil.copy(out / f"{name}.ipynb", tmp_path / f"{name}.ipynb") for name in ("04_pruning", "06_summary")}
    monkeypatch.setattr(papermill, "execute_notebook", lambda source, target, **k: shutil.copy(executed[Path(source).stem], target))
    metrics_file = next((out.parent / "runs" / "prune").glob("*/metrics.json"))
    os.utime(metrics_file, ns=(time.time_ns(), time.time_ns()))
    capsys.readouterr()
    assert report.build("smoke", out, overrides=overrides) == 0
    printed = capsys.readouterr().out
    assert "[report] 04_pruning with" in printed and "[report] 06_summary with" in printed
    assert printed.count(": up to date") == len(report.plan("smoke")) - 2, printed


def test_report_fails_naming_the_notebook_and_the_bad_key(tmp_path, capsys):
    code = report.build("smoke", tmp_path / "reports", overrides={"run_root": str(tmp_path / "runs"), "epohcs": 1})
    assert code == 1
    err = capsys.readouterr().err
    assert "01_baseline failed in cell" in err and "ParamsError" in err and "'epohcs'" in err
    assert not (tmp_path / "runs").exists()  # refused before any work
    assert "FAILED" in (tmp_path / "reports" / "index.html").read_text()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs Debian's chromium)")
def test_every_report_opens_in_a_browser_with_its_figures_and_no_errors(smoke_report):
    out, _ = smoke_report
    index = _dom(out / "index.html")
    pages = re.findall(r"href=\"([0-9]{2}_[a-z]+\.html)\"", index)
    assert len(pages) == len(report.plan("smoke")), pages  # one link per notebook of the profile
    for page in pages:
        dom = _dom(out / page)
        assert "Traceback" not in dom and "Error</span>" not in dom, page
        figures = re.findall(r'<img[^>]*src="data:image/png;base64,([^"]+)"', dom)
        assert figures, f"{page} shows no figure"
        for i, data in enumerate(figures):
            image = Image.open(io.BytesIO(base64.b64decode(data))).convert("L")
            assert min(image.size) > 100, f"{page}: figure {i} is {image.size}"
            low, high = image.getextrema()
            assert high - low > 50, f"{page}: figure {i} is blank"


def _dom(path):
    """The page as headless Chromium builds it (the DOM after loading)."""
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            f"--user-data-dir={profile}", "--dump-dom", path.as_uri()],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "<body" in r.stdout, r.stderr[-1000:]
    return r.stdout


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])  # Ctrl-C; a kill ends the same way
def test_a_report_whose_forced_build_was_interrupted_is_built_again(tmp_path, monkeypatch, interruption):
    # Before: the old stamp stayed on disk, and the next plain build called the half-executed report up to date
    # and the index showed a blank row (issue 17, item 2).
    import papermill

    out, store = tmp_path / "reports", tmp_path / "runs"
    overrides = {"run_root": str(store), "progress": False}
    ran = []

    def complete(source, target, **kwargs):  # a notebook that ran to the end: its headline and what it read
        ran.append(Path(source).stem)
        nb = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell("")
        cell.outputs = [nbformat.v4.new_output("display_data", {"text/markdown": "**Result:** done"},
                                               metadata={report.HEADLINE_KEY: "done", report.READS_KEY: ["baseline"]})]
        nb.cells = [cell]
        nbformat.write(nb, str(target))

    def interrupted(source, target, **kwargs):  # papermill has begun rewriting the report when it is stopped
        ran.append(Path(source).stem)
        nbformat.write(nbformat.v4.new_notebook(), str(target))
        raise interruption()

    (store / "baseline").mkdir(parents=True)
    monkeypatch.setattr(papermill, "execute_notebook", complete)
    assert report.build("smoke", out, only=["01_baseline"], overrides=overrides) == 0 and ran == ["01_baseline"]
    assert report.build("smoke", out, only=["01_baseline"], overrides=overrides) == 0 and ran == ["01_baseline"]
    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    with pytest.raises(interruption):
        report.build("smoke", out, only=["01_baseline"], overrides=overrides, force=True)
    assert "01_baseline" not in report._read_stamps(out)
    monkeypatch.setattr(papermill, "execute_notebook", complete)
    ran.clear()
    assert report.build("smoke", out, only=["01_baseline"], overrides=overrides) == 0
    assert ran == ["01_baseline"]  # run again, not "up to date"
    assert "done" in (out / "index.html").read_text()


def test_the_index_names_the_profile_each_report_was_built_with(tmp_path, monkeypatch):
    # Before: after `make report` (default) then a PROFILE=smoke build of one notebook into the same folder, the
    # index said "Profile smoke" and `params/pruning_smoke.yaml` beside reports built by the default profile
    # (issue 17, item 7).
    import papermill

    out, store = tmp_path / "reports", tmp_path / "runs"
    (store / "baseline").mkdir(parents=True)
    overrides = {"run_root": str(store), "progress": False}

    def complete(source, target, parameters, **kwargs):  # the default params files leave `profile` to the notebook
        nb = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell("")
        cell.outputs = [nbformat.v4.new_output("display_data", {"text/markdown": "done"}, metadata={
            report.HEADLINE_KEY: f"{Path(source).stem} of {parameters.get('profile', 'default')}", report.READS_KEY: ["baseline"]})]
        nb.cells = [cell]
        nbformat.write(nb, str(target))

    def interrupted(source, target, **kwargs):
        nbformat.write(nbformat.v4.new_notebook(), str(target))
        raise KeyboardInterrupt()

    monkeypatch.setattr(papermill, "execute_notebook", complete)
    assert report.build("default", out, overrides=overrides) == 0
    assert report.build("smoke", out, only=["01_baseline"], overrides=overrides) == 0
    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report.build("smoke", out, only=["05_svd"], overrides=overrides)
    monkeypatch.setattr(papermill, "execute_notebook", complete)
    assert report.build("smoke", out, only=["02_optuna"], overrides=overrides) == 0
    page = (out / "index.html").read_text()
    rows = {re.search(r"href='([0-9a-z_]+)\.html'", r).group(1): r for r in re.findall(r"<tr><td>.*?</tr>", page)}
    assert len(rows) == len(report.plan("default"))
    plan = {name: params_file.name for name, params_file in report.plan("default")}
    smoke = {name: params_file.name for name, params_file in report.plan("smoke")}
    for name in ("01_baseline", "02_optuna"):
        assert f"<code>smoke</code>" in rows[name] and f"params/{smoke[name]}" in rows[name] and f"{name} of smoke" in rows[name]
    for name in ("03_quantization", "04_pruning", "06_summary"):
        assert "<code>default</code>" in rows[name] and f"params/{plan[name]}</code>" in rows[name], rows[name]
        assert f"params/{smoke[name]}" not in rows[name] and f"{name} of default" in rows[name]
    assert "unknown: its last build did not finish" in rows["05_svd"] and "smoke" not in rows["05_svd"]
    assert "rows of another profile (default, unknown) are reports left by an earlier build" in page


def test_a_damaged_build_stamp_means_every_report_is_rebuilt(tmp_path):
    (tmp_path / report.STAMPS).write_text("{ half written")
    assert report._read_stamps(tmp_path) == {}
    (tmp_path / report.STAMPS).write_text('["not", "a", "mapping"]')
    assert report._read_stamps(tmp_path) == {}


# A shared run store with hostile text: what a colleague's `runs/` or a course archive could hold (issue 17, item 1).
HOSTILE = ("<img src=x onerror=\"document.body.setAttribute('data-pwned','img')\">"
           "<script>document.body.setAttribute('data-pwned','script')</script>")


def _poison(store):
    """Every display string of every run's metrics.json gets the payload appended (labels, lineage, parent
    labels, the machine), a stored artifact name becomes hostile, and a foreign run is added whose params name a
    hostile baseline, so that the reason the summary gives for not using it quotes the payload."""
    import json

    runs_done = sorted(store.glob("*/*/metrics.json"))
    for path in runs_done:
        m = json.loads(path.read_text())
        for key in ("label", "parent_label", "machine"):
            if isinstance(m.get(key), str):
                m[key] += HOSTILE
        if isinstance(m.get("lineage"), list):
            m["lineage"] = [x + HOSTILE if isinstance(x, str) else x for x in m["lineage"]]
        if "artifact" in m:
            m["artifact"] = "../../" + HOSTILE + ".pt"  # never followed: the technique names its file
        path.write_text(json.dumps(m))
    foreign = store / "svd" / "0123456789ab"
    foreign.mkdir()
    (foreign / "params.yaml").write_text(yaml.safe_dump({"baseline": HOSTILE}))
    (foreign / "metrics.json").write_text(json.dumps({"label": HOSTILE, "test_acc": 50.0}))
    return len(runs_done)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs Debian's chromium)")
def test_hostile_text_in_a_shared_run_store_renders_as_text_in_every_report(smoke_report, smoke_store, tmp_path):
    # Before: a label's onerror handler ran in 06_summary.html (Markdown and Styler tables took it as HTML).
    _, overrides = smoke_report
    store = smoke_store()  # a copy of the smoke report's run store
    assert _poison(store) > 10
    out = tmp_path / "reports"
    # 02 shows its study's trials and its own retrained run, no text of the poisoned metrics: left out (a study's
    # rebuild costs the suite time and tests nothing here)
    reports = [name for name, _ in report.plan("smoke") if name != "02_optuna"]
    assert report.build("smoke", out, only=reports, overrides={**overrides, "run_root": str(store)}) == 0
    pages = sorted(out.glob("[0-9][0-9]_*.html"))
    assert len(pages) == 2 * len(reports)  # each report's page for readers and its page with code
    shown = 0
    for page in pages + [out / "index.html"]:
        dom = _dom(page)
        assert not re.search(r"<body[^>]*data-pwned", dom), page.name  # no handler or script ran
        assert not re.search(r"<img[^>]*src=\"x\"", dom) and "<script>document.body" not in dom, page.name
        shown += dom.count("onerror=\"document.body") + dom.count("&lt;img src=x onerror=")
    assert shown > 0  # the payload is there, as text
