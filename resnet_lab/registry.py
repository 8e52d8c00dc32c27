"""The techniques the lab knows: one `Technique` record each, registered by its own module.

A technique is a kind of run in the run store (its folder name, and its name in a params chain). Its
module (`resnet_lab/techniques/<name>.py`) owns everything about it: its link settings (`config`, typed
`Field`s), the transform (`make`), its file format (`save`/`loader`), its name in tables (`describe`) and
this registration. Everything else — the chains in params, the shared step mechanism (`steps`), the
summary, `make bench`, the ONNX export — reads this registry and names no technique.

Adding a technique is one new module under `resnet_lab/techniques/` that calls `register(Technique(...))`,
listed in `resnet_lab/techniques/__init__.py` (or imported by the caller, as the toy technique of the
tests is).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from . import config, packed, runs
from .config import Field, ParamsError

if TYPE_CHECKING:
    from .steps import Step


@dataclass
class Made:
    """What a technique's `make` computed: the model to save, its arch record, the test accuracy right after
    the transform (before fine-tuning; None for a step that does not fine-tune), the fine-tuning history,
    and fields of its own for the row."""
    model: nn.Module
    arch: dict
    before: float | None = None
    history: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Technique:
    kind: str  # run-store folder of its runs; its name in a chain (`then: [int8]`)
    notebook: str  # the notebook whose params make it on its own
    family: str  # baseline | quantization | pruning | factorization
    describe: Callable[[dict], str] = lambda settings: ""  # a link's name from its settings, e.g. "INT8 (x86)"
    make: Callable[["Step"], Made] | None = None  # computes a link (None: not a step, e.g. the baseline)
    save: Callable[[nn.Module, Any, dict], Any] = packed.save_model  # (model, path, arch record) -> its file
    loader: Callable[[runs.Run], nn.Module] | None = None  # default: `packed.load_model` of the artifact
    artifact: str = "packed.pt"  # the file `save` writes in the run folder
    config: dict[str, Field] = field(default_factory=dict)  # a link's settings: type, default, range, help
    # settings a link takes from the stage's params when the chain does not give them: {link key: stage key}
    inherit: dict[str, str] = field(default_factory=dict)
    check: Callable[[str, dict[str, Any]], None] = lambda where, settings: None  # what spans a link's keys
    trains: bool = False  # it fine-tunes: the recipe and the seed belong to its runs' identity
    prunes: bool = False  # it removes or zeroes weights: descendants are scored against the unpruned model
    terminal: bool = False  # its model is not transformed further (a chain ends with it)
    followed_by: tuple[str, ...] | None = None  # the only kinds that may transform its model (None: any)
    follow: Callable[[dict], tuple[str, ...]] = lambda settings: ()  # kinds a stage applies to its model next
    cpu_only: bool = False  # its model runs on CPU kernels only, so it is evaluated on the CPU
    normalize: Callable[[dict], dict] = lambda settings: settings  # drops settings that do not apply

    @property
    def is_step(self) -> bool:
        return self.make is not None

    def defaults(self) -> dict[str, Any]:
        """A link's own settings where neither the chain nor the stage gives them (required keys and the fine-tuning
        recipe left out: a link that trains takes its recipe from the stage)."""
        return {k: f.default for k, f in self.config.items() if not f.required and k not in config.LINK_TRAINING}

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


def register(t: Technique) -> Technique:
    """Add a technique (replacing one of the same kind)."""
    _TECHNIQUES[t.kind] = t
    return t


def unregister(kind: str) -> None:
    """Remove a technique added with `register` (tests add toy ones)."""
    _TECHNIQUES.pop(kind, None)


def register_analysis(a: Analysis) -> Analysis:
    _ANALYSES[a.kind] = a
    return a


def techniques() -> dict[str, Technique]:
    """Every registered technique, the baseline first, then in registration order."""
    return dict(sorted(_TECHNIQUES.items(), key=lambda kv: kv[1].family != "baseline"))


def analyses() -> dict[str, Analysis]:
    return dict(_ANALYSES)


def get(kind: str) -> Technique:
    if kind not in _TECHNIQUES:
        raise ParamsError(f"unknown technique {kind!r}" + config.did_you_mean(kind, _TECHNIQUES)
                          + f"; known: {', '.join(_TECHNIQUES)}")
    return _TECHNIQUES[kind]


def steps_of(notebook: str) -> tuple[str, ...]:
    """The kinds of the steps a notebook makes on its own (03's methods: its quantization techniques)."""
    return tuple(k for k, t in _TECHNIQUES.items() if t.notebook == notebook and t.is_step)


def check_chain(key: str, value: Any) -> list[dict[str, dict[str, Any]]]:
    """A chain of links: a list whose items are a kind (`int8`) or a one-key mapping {kind: {settings}};
    returned as [{kind: {settings given}}], each setting checked against its technique's `config`. A bare kind
    stands for a one-link chain, `none` for no link."""
    if value is None or value == "none":
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise ParamsError(f"'{key}' must be a list of steps (e.g. [int8] or [{{svd: {{rank: 0.5}}}}, int8]), not "
                          f"{config.bounded(repr(value))}")
    links = {k: t for k, t in _TECHNIQUES.items() if t.is_step}
    out = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            kind, given = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            (kind, given), = item.items()
            given = {} if given is None else given
        else:
            raise ParamsError(f"'{where}' must be a step kind or a mapping {{kind: {{settings}}}}, not {item!r}")
        if kind not in links:
            raise ParamsError(f"'{where}' names unknown step {kind!r}" + config.did_you_mean(kind, links)
                              + f"; known: {', '.join(links)}")
        fields = links[kind].config
        if not isinstance(given, dict):
            raise ParamsError(f"'{where}.{kind}' must be a mapping of its settings ({', '.join(fields) or 'none'}), "
                              f"not {given!r}")
        unknown = [k for k in given if k not in fields]
        if unknown:
            raise ParamsError(f"unknown key '{where}.{kind}.{unknown[0]}'" + config.did_you_mean(unknown[0], fields)
                              + f"; a {kind} step may set {', '.join(fields) or 'nothing'}")
        missing = [k for k, f in fields.items() if f.required and k not in given]
        if missing:
            raise ParamsError(f"'{where}.{kind}' needs '{missing[0]}' ({fields[missing[0]].help})")
        checked = {k: fields[k].check(f"{where}.{kind}.{k}", v) for k, v in given.items()}
        if "seed" in checked and checked.get("seeds"):
            raise ParamsError(f"'{where}.{kind}' sets both 'seed' and 'seeds'; give one")
        out.append({kind: checked})
    return out


THEN = Field(object, [], "steps that follow each model made here, in order: a chain such as [int8], "
             "[{svd: {rank: 0.5}}, int8] or [binaryconnect]; each link is its own run", validator=check_chain)
