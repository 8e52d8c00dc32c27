"""The techniques the lab knows, owned here: one registration each.

A technique is a kind of run in the run store (its folder name, and its name in a params chain):
how a finished run's model is loaded, how a link is named, which notebook makes it on its own,
whether its descendants are scored against the unpruned model, and, for a compression step, how
the shared step mechanism (`steps`) computes it. The summary, `make bench` and the params chains
read this registry; none of them names a technique.

Adding a technique: its transform file (model in, model out, its file format), its link schema in
`params.LINKS` (or `settings` here), one `register(Technique(...))` in the module that orchestrates
its notebook, and notebook cells. The built-in registrations live in `stages/`; `techniques()`
imports them.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from . import packed
from . import params as params_mod
from . import runs, train

if TYPE_CHECKING:
    from .steps import Made, Step


@dataclass(frozen=True)
class Technique:
    kind: str  # run-store folder of its runs; its name in a chain (`then: [int8]`)
    notebook: str  # the notebook whose params make it on its own
    family: str  # baseline | quantization | pruning | factorization
    describe: Callable[[dict], str] = lambda settings: ""  # a link's name from its settings, e.g. "INT8 (x86)"
    make: Callable[["Step"], "Made"] | None = None  # computes a link (None: not a step, e.g. the baseline)
    save: Callable[[nn.Module, Any, dict], Any] = packed.save_model  # (model, path, arch record) -> its file
    loader: Callable[[runs.Run], nn.Module] | None = None  # default: `packed.load_model` of the artifact
    artifact: str = "packed.pt"  # the file `save` writes in the run folder
    defaults: Callable[[], dict[str, Any]] = dict  # a link's settings where the params give none
    settings: dict[str, params_mod.Field] | None = None  # its link schema, if not in params.LINKS yet
    check: Callable[[str, dict[str, Any]], None] = lambda where, settings: None  # what spans a link's keys
    trains: bool = False  # it fine-tunes: the recipe and the seed belong to its runs' identity
    prunes: bool = False  # it removes or zeroes weights: descendants are scored against the unpruned model
    terminal: bool = False  # its model is not transformed further (a chain ends with it)
    followed_by: tuple[str, ...] | None = None  # the only kinds that may transform its model (None: any)
    cpu_only: bool = False  # its model runs on CPU kernels only, so it is evaluated on the CPU
    normalize: Callable[[dict], dict] = lambda settings: settings  # drops settings that do not apply

    @property
    def is_step(self) -> bool:
        return self.make is not None

    def load(self, run: runs.Run) -> nn.Module:
        """The inference model of a finished run (on the CPU, float32 in and out)."""
        return self.loader(run) if self.loader else packed.load_model(run.file(self.artifact))


@dataclass(frozen=True)
class Analysis:
    """A kind of run that holds no model (a study, a sensitivity analysis): listed, never measured."""
    kind: str
    notebook: str
    description: str


_TECHNIQUES: dict[str, Technique] = {}
_ANALYSES: dict[str, Analysis] = {}
BUILTIN = ("resnet_lab.stages.quantization", "resnet_lab.stages.pruning", "resnet_lab.stages.factorization")
_loaded = False


def register(t: Technique) -> Technique:
    """Add a technique (replacing one of the same kind); its link schema joins `params.LINKS`."""
    if t.settings is not None:
        params_mod.LINKS[t.kind] = t.settings
    elif t.is_step and t.kind not in params_mod.LINKS:
        raise ValueError(f"technique {t.kind!r} has no link schema: give `settings` or add it to params.LINKS")
    _TECHNIQUES[t.kind] = t
    return t


def unregister(kind: str) -> None:
    """Remove a technique added with `register` (tests add toy ones)."""
    t = _TECHNIQUES.pop(kind, None)
    if t is not None and t.settings is not None:
        params_mod.LINKS.pop(kind, None)


def register_analysis(a: Analysis) -> Analysis:
    _ANALYSES[a.kind] = a
    return a


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN:
            importlib.import_module(module)


def techniques() -> dict[str, Technique]:
    """Every registered technique, the baseline first, in registration order."""
    _load_builtin()
    return dict(_TECHNIQUES)


def analyses() -> dict[str, Analysis]:
    _load_builtin()
    return dict(_ANALYSES)


def get(kind: str) -> Technique:
    known = techniques()
    if kind not in known:
        close = difflib.get_close_matches(kind, known, n=1)
        raise params_mod.ParamsError(f"unknown technique {kind!r}" + (f" (did you mean '{close[0]}'?)" if close else "")
                                     + f"; known: {', '.join(known)}")
    return known[kind]


register(Technique("baseline", "01_baseline", "baseline", describe=lambda s: "baseline (FP32)", loader=train.load_model,
                   artifact="model.pt"))
register_analysis(Analysis("optuna", "02_optuna", "analysis: an Optuna study (its trials train narrow proxies; the "
                                                  "retrained model is a baseline run)"))
