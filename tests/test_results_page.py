"""The measured-results page (`reports/index.html`) says where its figures came from: the date, the commit, the
machine and the profile (issue 31, item 6: no measured figure is typed by hand; the README links to this page)."""
import platform
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest
import torch

from resnet_lab import report

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                                reason="needs git and the project's git work tree")


def _git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pytest.skip("no model name in /proc/cpuinfo on this machine")


def _header(page):
    """The provenance block at the top of the index, as {field: its HTML}."""
    block = re.search(r"<dl class=provenance id=provenance>(.*?)</dl>", page, re.S)
    assert block, page[:2000]
    assert page.index("<dl class=provenance") < page.index("<table")  # it opens the page, before the results
    return dict(re.findall(r"<dt>(\w+)</dt><dd>(.*?)</dd>", block.group(1)))


def _entry(name="01_baseline", **extra):
    return {"name": name, "headline": "test accuracy of the run", "profile": "smoke", "params": "smoke.yaml",
            "failed": False, "seconds": 12.0, **extra}


def test_the_index_opens_with_the_commit_the_cpu_and_the_profile(tmp_path):
    page = report.write_index(tmp_path / "index.html", [_entry()], "smoke").read_text()
    header = _header(page)
    head = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    assert header["commit"] == f"<code>{head}</code>" + (" + uncommitted changes" if dirty else "")
    assert report.escape(_cpu_model()) in header["machine"]
    assert f"torch {torch.__version__} with {torch.get_num_threads()} threads" in header["machine"]
    assert ("; GPU " in header["machine"]) == torch.cuda.is_available()
    assert header["profile"] == "<code>smoke</code>"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d.*", header["built"])
    # the rows are still the reports: the header adds no row, no link
    assert re.findall(r"href='([^']+)'", page) == ["01_baseline.html", "01_baseline.code.html"]
    assert len(re.findall(r"<tr><td>", page)) == 1


def test_the_header_names_the_cpu_flags_that_decide_speed(tmp_path):
    from resnet_lab import metrics

    page = report.write_index(tmp_path / "index.html", [_entry()], "default").read_text()
    machine = _header(page)["machine"]
    flags = metrics.cpu_flags()
    if platform.system() == "Linux" and flags:
        have = [f for f in metrics.SPEED_FLAGS if f in flags]
        lacks = [f for f in metrics.SPEED_FLAGS if f not in flags]
        for f in have:
            assert re.search(rf"\b{f}\b", machine.split("lacks")[0]), (f, machine)
        for f in lacks:
            assert re.search(rf"\b{f}\b", machine.split("lacks", 1)[1]), (f, machine)


def test_the_commit_is_unknown_without_git_or_outside_the_work_tree(tmp_path, monkeypatch):
    assert report.git_commit(tmp_path) == "unknown"  # not a git work tree
    inner = tmp_path / "copy"
    inner.mkdir()
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert report.git_commit(inner) == "unknown"  # a copy unpacked inside another repository names no commit of its own
    monkeypatch.setenv("PATH", str(tmp_path / "no-binaries-here"))
    assert report.git_commit() == "unknown"
    page = report.write_index(tmp_path / "index.html", [_entry()], "smoke").read_text()
    assert _header(page)["commit"] == "<code>unknown</code>"


def test_a_row_an_earlier_build_measured_says_when_where_and_from_which_commit(tmp_path):
    now = report.provenance("default")
    hostile = "<script>alert(1)</script> CPU"
    earlier = {"built": "2026-01-02 03:04:05 UTC", "commit": "abc1234", "machine": hostile, "profile": "default"}
    entries = [_entry("01_baseline", profile="default", provenance=now),
               _entry("02_optuna", profile="default", skipped=True, seconds=0.0, built_in=30.0, provenance=earlier),
               _entry("03_quantization", profile="default", skipped=True, seconds=0.0, built_in=9.0,
                      provenance=dict(earlier, machine=now["machine"])),
               _entry("04_pruning", profile="default", seconds=None, provenance=["not", "a", "mapping"])]
    page = report.write_index(tmp_path / "index.html", entries, "default", now).read_text()
    rows = {re.search(r"href='([0-9a-z_]+)\.html'", r).group(1): r for r in re.findall(r"<tr><td>.*?</tr>", page)}
    assert "measured" not in rows["01_baseline"]  # measured by this build: the header says it
    assert "measured 2026-01-02 03:04:05 UTC at commit <code>abc1234</code>" in rows["02_optuna"]
    assert "another machine: &lt;script&gt;alert(1)&lt;/script&gt; CPU" in rows["02_optuna"]
    assert "<script>" not in page
    assert "commit <code>abc1234</code>" in rows["03_quantization"] and "another machine" not in rows["03_quantization"]
    assert "when and where were not recorded" in rows["04_pruning"]


def test_make_reports_build_stamps_each_report_with_its_provenance(tmp_path, monkeypatch):
    # the build path itself, with papermill replaced by a notebook that finishes at once
    import papermill

    def complete(source, target, **kwargs):
        nb = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell("")
        cell.outputs = [nbformat.v4.new_output("display_data", {"text/markdown": "**Result:** done"},
                                               metadata={report.HEADLINE_KEY: "done", report.READS_KEY: ["baseline"]})]
        nb.cells = [cell]
        nbformat.write(nb, str(target))

    out, store = tmp_path / "reports", tmp_path / "runs"
    (store / "baseline").mkdir(parents=True)
    monkeypatch.setattr(papermill, "execute_notebook", complete)
    overrides = {"run_root": str(store), "progress": False}
    assert report.build("smoke", out, only=["01_baseline"], overrides=overrides) == 0
    stamp = report._read_stamps(out)["01_baseline"]["provenance"]
    head = _git("rev-parse", "--short", "HEAD")
    assert stamp["commit"].startswith(head) and stamp["profile"] == "smoke" and _cpu_model() in stamp["machine"]
    first = (out / "index.html").read_text()
    assert _header(first)["built"] == report.escape(stamp["built"]) and "<small>" not in first  # measured now
    # built again: up to date, so the row says its figures are those of the first build
    assert report.build("smoke", out, only=["01_baseline"], overrides=overrides) == 0
    again = (out / "index.html").read_text()
    assert f"measured {report.escape(stamp['built'])} at commit <code>{report.escape(stamp['commit'])}</code>" in again
    assert _header(again)["profile"] == "<code>smoke</code>"


# ---------------------------------------------------------------- the reader's page (issue 33, items 4 and 6)
def _executed(tmp_path, show_table: bool):
    """An executed notebook shaped like 06's "Does each technique beat the baseline?" section at 36ae41b: a table
    built, then a sentence displayed; `show_table` says whether the table reached the outputs."""
    table = nbformat.v4.new_output("display_data", data={"text/html": "<table><tr><td>1</td></tr></table>"})
    sentence = nbformat.v4.new_output("display_data", data={"text/markdown": "No model is detectably better."})
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("run_root = '<script>alert(1)</script>'", metadata={"tags": ["injected-parameters"]}),
        nbformat.v4.new_markdown_cell("## Does each technique beat the baseline?\nFor each group ..."),
        nbformat.v4.new_code_cell("plots.show_table(summary.beats_baseline(s, df))\ndisplay(Markdown(sentence))",
                                  outputs=([table] if show_table else []) + [sentence]),
        nbformat.v4.new_markdown_cell("## Training"),
        nbformat.v4.new_code_cell("train(p)", outputs=[
            nbformat.v4.new_output("stream", name="stdout", text="".join(f"epoch {i}: loss 1.0\n" for i in range(40))),
            nbformat.v4.new_output("stream", name="stderr", text="UserWarning: something internal\n")])])
    path = tmp_path / "06_summary.ipynb"
    nbformat.write(nb, path)
    return path


def test_a_section_that_builds_a_table_and_shows_none_is_named(tmp_path):
    assert report.silent_sections(_executed(tmp_path, show_table=False)) == ["Does each technique beat the baseline?"]
    assert report.silent_sections(_executed(tmp_path, show_table=True)) == []


def test_the_readers_page_shows_findings_and_the_code_page_everything(tmp_path):
    page = report.render_html(_executed(tmp_path, show_table=True), tmp_path / "06_summary.html")
    reader, full = page.read_text(), report.code_page(page).read_text()
    assert "beats_baseline" not in reader and "beats_baseline" in full  # code only on the full page
    assert "UserWarning" not in reader and "UserWarning" in full  # warnings only on the full page
    assert "Parameters that ran" in reader and "run_root = '&lt;script&gt;alert(1)&lt;/script&gt;'" in reader
    assert "epoch 0: loss 1.0 … (40 lines; open to read)</summary>" in reader  # the log folded, kept
    assert "epoch 39: loss 1.0" in reader and "<table>" in reader
    assert "href=\"06_summary.code.html\"" in reader
