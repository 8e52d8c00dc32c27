"""Command line over the same verbs the notebooks call.

    python -m resnet_lab check params/baseline.yaml          validate a params file
    python -m resnet_lab train params/baseline.yaml          train (or reuse) the baseline's run of each seed
    python -m resnet_lab tune params/optuna.yaml             run (resume, or join) the Optuna study
    python -m resnet_lab tune params/optuna.yaml --storage postgresql://user@host/db   the same, shared
    python -m resnet_lab report [--profile smoke] [--force]  run and render every notebook not up to date
    python -m resnet_lab bench [params/bench.yaml]           training-throughput benchmark
    python -m resnet_lab export runs/<stage>/<key>           the run's model as ONNX (model.onnx), checked
"""
from __future__ import annotations

import argparse
import json
import sys

from . import params
from .runs import PROJECT_ROOT, RunStoreError, resolve, write_json
from .data import DataUnavailable


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resnet_lab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate a params file against a stage's schema")
    c.add_argument("file")
    c.add_argument("--stage", choices=sorted(params.SCHEMAS),
                   help="the stage to check it for (default: inferred from its keys, and said)")
    t = sub.add_parser("train", help="train the baseline for a params file, one run per training seed (reuses finished runs)")
    t.add_argument("file")
    o = sub.add_parser("tune", help="run the Optuna study of a params file until it has n_trials finished trials")
    o.add_argument("file")
    o.add_argument("--storage", help="the study's storage, in place of the file's `storage` (e.g. the same "
                                     "postgresql://user@host/db on every machine that shares the study)")
    r = sub.add_parser("report", help="execute the notebooks with papermill and render HTML reports")
    r.add_argument("--profile", default="default")
    r.add_argument("--out", default="reports")
    r.add_argument("--only", nargs="*", help="notebook names to run (default: all of the profile)")
    r.add_argument("--force", action="store_true", help="execute every notebook, even those whose report is up to date")
    b = sub.add_parser("bench", help="training throughput: pipeline vs compute limit vs stock DataLoader")
    b.add_argument("file", nargs="?", default=str(PROJECT_ROOT / "params" / "bench.yaml"))
    b.add_argument("--json", default="reports/bench.json", help="where to write the figures")
    e = sub.add_parser("export", help="write a finished run's model as ONNX into its folder and check it against the "
                                      "PyTorch model on the test set")
    e.add_argument("run", help="the run folder, e.g. runs/int8/144e2ec1b5dd")
    a = ap.parse_args(argv)

    try:
        if a.cmd == "check":
            stage = a.stage or params.infer_stage(a.file)
            how = "" if a.stage else " (inferred from its keys; --stage checks it for another)"
            try:
                p = params.load(a.file, stage)
            except params.ParamsError as e:
                raise params.ParamsError(f"{e} [checked for stage '{stage}'{how}]") from None
            print(f"{a.file}: valid for stage '{stage}'{how}")
            print(json.dumps(p, indent=1))
        elif a.cmd == "train":
            from . import baselines

            for result in baselines.replicates(params.load(a.file, "baseline")):  # `seed`, then the other `seeds`
                state = "reused" if result.reused else "trained"
                print(f"{state} {result.run.dir}: test accuracy {result.metrics['test_acc']:.2f}%", flush=True)
        elif a.cmd == "tune":
            from . import tune

            p = params.load(a.file, "optuna")
            if a.storage is not None:
                p = params.validate({**p, "storage": a.storage}, "optuna")
            study = tune.run(p)
            choice = tune.choose(study, p)
            print(f"study {study.study_name}: {len(study.get_trials(states=tune.FINISHED))} finished trials, "
                  f"best validation accuracy {study.best_value:.2f}%; chosen: trial {choice.trial.number}, because "
                  f"{choice.reason}; its params: {tune.write_best(study, p, choice)}")
        elif a.cmd == "report":
            from . import report

            return report.build(a.profile, a.out, a.only, force=a.force)
        elif a.cmd == "bench":
            from . import bench

            p = params.load(a.file, "bench")
            result = bench.run(p)
            print(bench.describe(result))
            result["inference"] = bench.inference(p)
            if result["inference"]:
                print(bench.describe_inference(result["inference"]))
            write_json(resolve(a.json), result)
        elif a.cmd == "export":
            from . import export

            e = export.export_run(a.run)
            print(f"{'reused' if e.reused else 'wrote'} {e.path} ({e.size_kb:,.0f} KB, "
                  f"{'int8 QDQ' if e.quantized else 'float32'} graph, {e.exporter}): its predicted class matches the "
                  f"PyTorch model's on {e.agreement:.2f}% of {e.images} test images"
                  + (f" (the PyTorch model keeps its own prediction on {e.stability:.2f}% of them under input noise of "
                     f"{export.NOISE_LEVELS:g} pixel levels)" if e.stability is not None else ""))
    except (params.ParamsError, DataUnavailable, RunStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
