"""`make report`: run every notebook with papermill, render each to HTML, link them from an index.

Which notebooks run, in which order, with which params file per profile, and which stages of the
run store each one reads, is the table in params/report.yaml (one line per notebook).

A notebook whose report is up to date is not executed again: up to date means its notebook file,
its parameter values and the resnet_lab source are what they were when it last ran, and the run
store folders of the stages it reads hold the same files (names, sizes, modification times) as at
the end of that build. `--force` executes every notebook anyway (finished runs are still reused).
"""
from __future__ import annotations

import hashlib
import html
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from IPython.display import Markdown as IPythonMarkdown

from . import params as params_mod
from .runs import PROJECT_ROOT, RunStoreError, file_lock, read_json, resolve, write_json, write_text

KERNEL = "resnet-lab"
HEADLINE_KEY = "resnet_lab/headline"
READS_KEY = "resnet_lab/reads"
PLAN_FILE = PROJECT_ROOT / "params" / "report.yaml"
STAMPS = ".build.json"  # in the reports folder: what each report was built from
EVERYTHING = "*"  # a notebook that reads the whole run store (06)


def escape(text: str) -> str:
    """`text` with the characters HTML acts on (&, <, >) written as entities, so that a string read from a file
    (a run's label, a reason, a path) shows as text in a report and never becomes markup or a script. Markdown
    formatting (**bold**, `code`, lists) is untouched."""
    return html.escape(text, quote=False)


class Markdown(IPythonMarkdown):
    """IPython's Markdown display with its text escaped (`escape`): what the notebooks show. A run store is shared
    (a colleague's `runs/`, a course's archive), and its strings reach the reports' Markdown; with IPython's own
    class a label such as `<img src=x onerror=…>` ran its script in the browser of whoever opened the report."""

    def __init__(self, data=None, *args, **kwargs):
        super().__init__(escape(data) if isinstance(data, str) else data, *args, **kwargs)


def headline(text: str, reads: list | None = None) -> None:
    """Show a one-line result in the notebook; the report index quotes it. `reads`: the run folders the
    notebook read (runs, or paths relative to the run store; "*": all of it), recorded in the output so that
    `make report` re-executes the notebook exactly when one of them changes."""
    from IPython.display import display

    meta = {HEADLINE_KEY: text}  # the index escapes it where it quotes it
    if reads is not None:
        meta[READS_KEY] = [r if isinstance(r, str) else f"{r.stage}/{r.key}" for r in reads]
    display(Markdown(f"**Result:** {text}"), metadata=meta)


def plan(profile: str = "default", only: list[str] | None = None) -> list[tuple[str, Path]]:
    """(notebook name, params file) pairs for a profile, in run order."""
    table = params_mod.read_yaml(PLAN_FILE)
    steps = []
    for name, by_profile in table.items():
        if only and name not in only:
            continue
        if not isinstance(by_profile, dict) or profile not in by_profile:
            known = sorted({p for v in table.values() if isinstance(v, dict) for p in v})
            raise params_mod.ParamsError(f"{PLAN_FILE}: notebook {name} has no params file for profile "
                                         f"'{profile}'; profiles: {', '.join(known)}")
        steps.append((name, PROJECT_ROOT / "params" / by_profile[profile]))
    if only and len(steps) != len(only):
        raise params_mod.ParamsError(f"unknown notebook(s) {sorted(set(only) - {s[0] for s in steps})}; known: {', '.join(table)}")
    return steps


def inputs_digest(name: str, values: dict[str, Any]) -> str:
    """What a report is computed from, besides the run store: its notebook, its parameters, the module's code."""
    h = hashlib.sha256((PROJECT_ROOT / "notebooks" / f"{name}.ipynb").read_bytes())
    h.update(json.dumps(values, sort_keys=True, default=str).encode())
    package = PROJECT_ROOT / "resnet_lab"
    for source in sorted(package.rglob("*.py")):  # subpackages too: stages/, techniques/
        h.update(source.relative_to(package).as_posix().encode() + source.read_bytes())
    return h.hexdigest()


def store_digest(run_root: str | Path, reads: list[str]) -> str:
    """The state of the run-store folders a notebook read (paths relative to the store, "*": all of it): every
    file's path, size and modification time (lock and temporary files, whose names start with a dot, left out).
    A folder that is gone changes it too."""
    root = resolve(run_root)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if EVERYTHING in reads and root.is_dir() else \
        [root / r for r in sorted(set(reads))]
    h = hashlib.sha256()
    for folder in folders:
        h.update(f"{folder.relative_to(root)} {folder.is_dir()}\n".encode())
        for f in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts):
                st = f.stat()
                h.update(f"{f.relative_to(root)} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def build(profile: str = "default", out: str | Path = "reports", only: list[str] | None = None,
          overrides: dict[str, Any] | None = None, force: bool = False) -> int:
    """Run and render the notebooks of `profile` whose reports are not up to date (all with `force`);
    return 0, or 1 naming the notebook and cell that failed."""
    out = resolve(out)
    out.mkdir(parents=True, exist_ok=True)
    # papermill rewrites the executed notebook as it runs: two builds into one folder take turns
    # (the second then finds the reports up to date)
    with file_lock(out / ".report.lock", busy=f"[report] another build is writing {out}; waiting for it to finish"):
        return _build(profile, out, only, overrides, force)


def _read_stamps(out: Path) -> dict[str, dict]:
    try:
        stamps = read_json(out / STAMPS)
    except RunStoreError:  # missing or damaged: every report counts as out of date
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _build(profile: str, out: Path, only: list[str] | None, overrides: dict[str, Any] | None, force: bool) -> int:
    import papermill as pm

    stamps = _read_stamps(out)
    done: list[dict] = []
    failure = None
    now = provenance(profile)  # where and from what the reports this build executes are measured
    for name, params_file in plan(profile, only):
        values = {**params_mod.read_yaml(params_file), **(overrides or {})}
        executed, page = out / f"{name}.ipynb", out / f"{name}.html"
        inputs, run_root = inputs_digest(name, values), values.get("run_root", "runs")
        stamp = stamps.get(name, {})
        entry = {"name": name, "params": params_file.name, "profile": profile, "failed": False, "inputs": inputs,
                 "run_root": str(run_root)}
        if (not force and stamp.get("inputs") == inputs and executed.is_file() and page.is_file()
                and isinstance(stamp.get("reads"), list) and stamp.get("store") == store_digest(run_root, stamp["reads"])):
            print(f"[report] {name}: up to date (built in {stamp.get('seconds', 0):.0f} s; --force runs it again)", flush=True)
            done.append({**entry, "seconds": 0.0, "built_in": stamp.get("seconds"), "skipped": True,
                         "reads": stamp["reads"], "headline": read_output(executed, HEADLINE_KEY),
                         "provenance": stamp.get("provenance")})
            continue
        print(f"[report] {name} with {params_file.relative_to(PROJECT_ROOT)}", flush=True)
        # its stamp leaves the disk before papermill starts rewriting the report: a build interrupted now (Ctrl-C,
        # a kill) leaves it unstamped, so the next build runs it again instead of calling a half-run report up to date
        if stamps.pop(name, None) is not None:
            write_json(out / STAMPS, stamps)
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(PROJECT_ROOT / "notebooks" / f"{name}.ipynb", executed, parameters=values,
                                kernel_name=KERNEL, cwd=str(PROJECT_ROOT), progress_bar=True)
        except pm.PapermillExecutionError as e:
            failure = f"{name} failed in cell [{e.exec_count}]: {e.ename}: {e.evalue}"
        seconds = time.perf_counter() - t0
        if executed.is_file():
            render_html(executed, page)
            for silent in silent_sections(executed) if not failure else []:
                print(f"[report] {name}: section '{silent}' builds a table or figure and shows none",
                      file=sys.stderr, flush=True)
        done.append({**entry, "seconds": seconds, "built_in": seconds, "skipped": False, "failed": bool(failure),
                     "provenance": now,
                     "headline": read_output(executed, HEADLINE_KEY) if executed.is_file() else None,
                     "reads": read_output(executed, READS_KEY) if executed.is_file() else None})
        if failure:
            break
    # every report built or checked now is stamped with the run folders it read, as this build leaves them
    # (a notebook that recorded none is never up to date)
    for d in done:
        if not d["failed"] and isinstance(d["reads"], list):
            stamps[d["name"]] = {"inputs": d["inputs"], "reads": d["reads"], "store": store_digest(d["run_root"], d["reads"]),
                                 "seconds": d["built_in"], "profile": d["profile"], "params": d["params"],
                                 "provenance": d.get("provenance")}
    write_json(out / STAMPS, stamps)
    write_index(out / "index.html", _with_earlier_reports(done, profile, out, stamps), profile, now)
    print("[report] wall time: " + ", ".join(f"{d['name']} {d['seconds']:.0f} s" + (" (up to date)" if d["skipped"] else "")
                                             for d in done)
          + f"; total {sum(d['seconds'] for d in done):.0f} s", flush=True)
    if failure:
        print(f"[report] FAILED: {failure}. The executed notebook, with the error, is {out / (done[-1]['name'] + '.html')}",
              file=sys.stderr)
        return 1
    print(f"[report] open {out / 'index.html'}")
    return 0


def _with_earlier_reports(done: list[dict], profile: str, out: Path, stamps: dict[str, dict]) -> list[dict]:
    """Entries for every notebook of the plan that has a report in `out`, not only those run now; one built
    earlier carries the profile and params file its stamp records (another profile's, after a build of this one
    stopped or ran only some notebooks), or none when its last build did not finish."""
    ran = {d["name"]: d for d in done}
    entries = []
    for name, _ in plan(profile):
        if name in ran:
            entries.append(ran[name])
        elif (out / f"{name}.ipynb").is_file() and (out / f"{name}.html").is_file():
            stamp = stamps.get(name, {})
            entries.append({"name": name, "params": _text(stamp.get("params")), "profile": _text(stamp.get("profile")),
                            "seconds": None, "failed": False, "headline": read_output(out / f"{name}.ipynb", HEADLINE_KEY),
                            "provenance": stamp.get("provenance")})
    return entries


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def render_html(notebook: Path, target: Path) -> Path:
    """The reader's page `target` and, beside it, the full one (`code_page`). The reader's shows what the notebook
    found: the parameters that ran, every output, long logs folded, no code and no warnings; the full page keeps
    the code and everything it printed, and the reader's links to it."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = _clean_streams(nbformat.read(notebook, as_version=4))
    tags = [set(c.metadata.get("tags", [])) for c in nb.cells]
    if any("injected-parameters" in t for t in tags):  # show the parameters that ran, not the defaults too
        nb.cells = [c for c, t in zip(nb.cells, tags) if "parameters" not in t]
    full = code_page(target)
    exporter = HTMLExporter(template_name="lab", exclude_input_prompt=True, exclude_output_prompt=True)
    write_text(full, exporter.from_notebook_node(nb)[0])
    reader = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    return write_text(target, reader.from_notebook_node(_for_readers(nb, full.name))[0])


def code_page(page: Path) -> Path:
    """The full version of a report page (its code and everything it printed): `06_summary.code.html`."""
    return page.with_name(page.stem + ".code.html")


LOG_LINES = 12  # a printed log longer than this is folded in the reader's page (01's epoch lines, tqdm's last bars)


def _for_readers(nb, full: str):
    """The notebook as a reader's page shows it (its code inputs are left out by the exporter): the parameters that
    ran as text, warnings (stderr) left to the full page, a long printed log folded under its first line, and a link
    to the full page on top."""
    import copy

    import nbformat

    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if "injected-parameters" in cell.metadata.get("tags", []):
            nb.cells[i] = nbformat.v4.new_markdown_cell("<details><summary>Parameters that ran</summary>\n<pre>"
                                                        + html.escape(cell.source) + "</pre></details>")
            continue
        outputs = []
        for o in cell.get("outputs", []):
            if o.output_type == "stream" and o.name == "stderr":
                continue
            if o.output_type == "stream" and o.text.count("\n") > LOG_LINES:
                lines = o.text.rstrip("\n").split("\n")
                o = nbformat.v4.new_output("display_data", data={"text/html": (
                    f"<details class=log><summary>{html.escape(lines[0])} … ({len(lines)} lines; open to read)</summary>"
                    f"<pre>{html.escape(o.text)}</pre></details>")})
            outputs.append(o)
        cell.outputs = outputs
    link = nbformat.v4.new_markdown_cell(f"<small>This page shows what the notebook found. "
                                         f"[The same report with its code and everything it printed]({full}).</small>")
    nb.cells.insert(0, link)
    return nb


def _clean_streams(nb):
    """Progress bars as the browser would have left them: papermill stores every tqdm redraw as its own
    output; merge them, apply the carriage returns, and drop what ends up blank (cleared bars)."""
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    merge = CoalesceStreamsPreprocessor(enabled=True)
    nb, _ = merge.preprocess(nb, {})
    for cell in nb.cells:
        if "outputs" in cell:
            cell.outputs = [o for o in cell.outputs if o.output_type != "stream" or o.text.strip()]
    nb, _ = merge.preprocess(nb, {})
    return nb


def silent_sections(notebook: Path) -> list[str]:
    """The sections (`##`/`###` headings) of an executed notebook whose code calls `plots` (a table or a figure)
    and that show neither: a table that is not its cell's last expression, nor passed to `display`, renders
    nothing and raises nothing (06's "Does each technique beat the baseline?" showed only its sentence)."""
    import re

    import nbformat

    sections: list[list] = [["(top)", "", False]]  # heading, its code, whether it shows a table or a figure
    for cell in nbformat.read(notebook, as_version=4).cells:
        heading = re.search(r"^#{2,3} +(.+)$", cell.source, re.M) if cell.cell_type == "markdown" else None
        if heading:
            sections.append([heading.group(1).strip(), "", False])
        if cell.cell_type == "code":
            sections[-1][1] += cell.source + "\n"
            for o in cell.get("outputs", []):
                data = o.get("data", {})
                sections[-1][2] |= "<table" in str(data.get("text/html", "")) or "image/png" in data
    return [heading for heading, code, shown in sections if re.search(r"\bplots\.\w+\(", code) and not shown]


def read_output(notebook: Path, key: str) -> Any:
    """The first output metadata value under `key` in an executed notebook (its headline, its reads), or None."""
    import nbformat

    for cell in nbformat.read(notebook, as_version=4).cells:
        for output in cell.get("outputs", []):
            value = output.get("metadata", {}).get(key)
            if value:
                return value
    return None


def _took(entry: dict) -> str:
    if entry.get("skipped"):
        return "up to date" + (f" (built in {entry['built_in']:.0f} s)" if entry.get("built_in") is not None else "")
    return "earlier run" if entry["seconds"] is None else f"{entry['seconds']:.0f} s"


UNKNOWN = "<i>unknown: its last build did not finish</i>"


def git_commit(root: Path = PROJECT_ROOT) -> str:
    """The commit the project's code is at: its short hash, followed by "+ uncommitted changes" when a tracked file
    differs from it (untracked files, such as the generated reports/ and runs/, do not count); "unknown" where git
    is missing, fails, or `root` is not the top of a git work tree (a copy unpacked inside another repository)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != Path(root).resolve():
            return "unknown"
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown"
    if not commit:
        return "unknown"
    return f"{commit} + uncommitted changes" if dirty else commit


def provenance(profile: str) -> dict[str, str]:
    """What the figures a build measures came from: when, the commit, the machine (the CPU with the flags that decide
    its kernels, cores, torch and its threads, the GPU if any: `metrics.machine()`) and the profile."""
    from . import metrics  # imports torch: only when a build or the index needs it

    return {"built": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z").strip(), "commit": git_commit(),
            "machine": metrics.machine(), "profile": profile}


def _provenance(value: Any) -> dict[str, str] | None:
    """A stamp's provenance as read from .build.json (a file on disk: anything), or None where it is not one."""
    if not isinstance(value, dict):
        return None
    kept = {k: value.get(k) for k in ("built", "commit", "machine", "profile")}
    return kept if all(isinstance(v, str) for v in kept.values()) else None


def _built_where(entry: dict, now: dict[str, str]) -> str:
    """For a report this build did not execute: when, at which commit and, when elsewhere, on which machine it was."""
    if entry.get("provenance") is now or (not entry.get("skipped") and entry.get("seconds") is not None):
        return ""
    earlier = _provenance(entry.get("provenance"))
    if earlier is None:
        return "<br><small>measured by an earlier build; when and where were not recorded</small>"
    text = f"measured {escape(earlier['built'])} at commit <code>{escape(earlier['commit'])}</code>"
    if earlier["machine"] != now["machine"]:
        text += f" on another machine: {escape(earlier['machine'])}"
    return f"<br><small>{text}</small>"


def write_index(path: Path, entries: list[dict], profile: str, built: dict[str, str] | None = None) -> Path:
    """The index page. It opens with the provenance of the build (`built`, from `provenance(profile)` when not
    given): the date, the commit, the machine and the profile the measured figures came from. Then one row per
    report with its headline, the profile and params file it was built with (each row its own: a report left by an
    earlier build of another profile says so), its build time and, for a report an earlier build measured, when, at
    which commit and on which machine."""
    built = built or provenance(profile)
    rows = "\n".join(
        f"<tr><td><a href='{html.escape(e['name'])}.html'>{html.escape(e['name'])}</a> "
        f"· <a class=code href='{html.escape(e['name'])}.code.html'>with code</a></td>"
        f"<td>{'<b class=fail>FAILED</b> ' if e['failed'] else ''}{html.escape(e['headline'] or '')}</td>"
        f"<td>{_code(e.get('profile'), UNKNOWN)}</td><td>{_code(e.get('params'), '<i>unknown</i>', 'params/')}</td>"
        f"<td class=num>{_took(e)}{_built_where(e, built)}</td></tr>"
        for e in entries)
    others = sorted({e.get("profile") or "unknown" for e in entries} - {profile})
    summary = (f"Built with profile <code>{html.escape(profile)}</code>" if not others else
               f"This build used profile <code>{html.escape(profile)}</code>; <b>rows of another profile "
               f"({html.escape(', '.join(others))}) are reports left by an earlier build</b>")
    commit, _, dirty = built["commit"].partition(" + ")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>resnet-lab reports</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .5rem .7rem; border-bottom: 1px solid #ddd; vertical-align: top; }}
th {{ background: #f3f3f3; }} .num {{ text-align: right; }} .fail {{ color: #b00; }}
dl.provenance {{ display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; background: #f7f7f7;
  padding: .7rem 1rem; border-left: 4px solid #888; }}
dl.provenance dt {{ font-weight: 600; }} dl.provenance dd {{ margin: 0; }}
</style></head><body>
<h1>resnet-lab reports</h1>
<dl class=provenance id=provenance>
<dt>built</dt><dd>{escape(built["built"])}</dd>
<dt>commit</dt><dd><code>{escape(commit)}</code>{" + " + escape(dirty) if dirty else ""}</dd>
<dt>machine</dt><dd>{escape(built["machine"])}</dd>
<dt>profile</dt><dd><code>{escape(built["profile"])}</code></dd>
</dl>
<p>The figures of the reports this build executed were measured then, on that machine, from that commit; a row
that an earlier build measured says when, at which commit and, if elsewhere, on which machine.
{summary}. Each report is a notebook executed by papermill: its page shows what it found (the parameters that ran at the top), and "with code" is the same page with its code and everything it printed.</p>
<table><thead><tr><th>report</th><th>result</th><th>profile</th><th>parameters</th><th>run time</th></tr></thead>
<tbody>
{rows}
</tbody></table>
</body></html>
"""
    return write_text(path, page)


def _code(value: str | None, unknown: str, prefix: str = "") -> str:
    return f"<code>{html.escape(prefix + value)}</code>" if value else unknown
