"""A compact file format for compressed weights: 1-bit signs, b-bit levels, bitmask-sparse tensors, dense values.

`save(state, path, arch)` stores each tensor of a state_dict in the smallest of three forms:
- signs: every output channel holds one magnitude α_c with signs (±1 or ±α: binary weights), maybe
  with zeros (pruned): 1 bit per sign (per nonzero when masked) + a 1-bit mask + α per channel;
- sparse: a 1-bit mask over the full shape plus the nonzero values in their dtype, used when the
  zeros saved outweigh the mask (more than 1/bits of the entries are zero: MicroNet's accounting);
- levels: a weight frozen at signed integer levels times a step per output channel (the caller names its
  bits and step tensor: `levels`): b bits per entry, the step stored as its own tensor;
- dense: the values in their dtype.
All bits share one uint8 tensor and values of each dtype one tensor, next to a layout of plain lists,
so a file loads with `torch.load(weights_only=True)` and costs no per-tensor overhead.

Every float model of the run store that compression made (pruned, factorized, half precision,
binarized) is one such file with the arch record that rebuilds it (`models.build`): `save_model`
writes it and `load_model` rebuilds the model, whatever chain of steps made it.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from . import models, runs

FORMAT = "resnet-lab/packed/1"
_LEGACY_BINARY = "resnet-lab/binary-weights/1"  # the first packed binary-weight files (signs and floats only)


def sign_magnitudes(w: torch.Tensor) -> torch.Tensor | None:
    """α per output channel if every nonzero entry of each channel is ±α_c (and the tensor is a real
    weight: ≥ 2 dims, ≥ 3 entries per channel); otherwise None."""
    if not w.is_floating_point() or w.dim() < 2 or w.shape[1:].numel() < 3:
        return None
    rows = w.detach().flatten(1).abs()
    alpha = rows.amax(1)
    if not bool(((rows == alpha[:, None]) | (rows == 0)).all()):
        return None
    return alpha


class _Writer:
    def __init__(self):
        self.bits: list[np.ndarray] = []
        self.n_bytes = 0
        self.values: dict[str, list[torch.Tensor]] = {}
        self.n_values: dict[str, int] = {}

    def add_bits(self, flags: torch.Tensor) -> int:
        packed = np.packbits(flags.cpu().numpy().ravel())
        self.bits.append(packed)
        self.n_bytes += packed.size
        return self.n_bytes - packed.size

    def add_values(self, t: torch.Tensor) -> tuple[str, int]:
        dtype = str(t.dtype).removeprefix("torch.")
        self.values.setdefault(dtype, []).append(t.detach().cpu().flatten())
        start = self.n_values.get(dtype, 0)
        self.n_values[dtype] = start + t.numel()
        return dtype, start


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """(q_min, q_max) of a `bits`-bit integer grid: signed −2^(b−1) … 2^(b−1)−1, unsigned 0 … 2^b−1."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def pack(state: Mapping[str, torch.Tensor], arch: dict,
         levels: Mapping[str, tuple[int, str]] | None = None) -> dict[str, Any]:
    """The packed form of `state` (see the module docstring). `levels`: {tensor name: (bits, name of its step
    tensor)} for weights that hold signed integer levels times a step per output channel."""
    out = _Writer()
    layout = []
    levels = levels or {}
    for name, t in state.items():
        entry: dict[str, Any] = {"name": name, "shape": list(t.shape)}
        bits, step = levels.get(name, (None, None))
        codes = _codes(t, state.get(step), bits) if bits else None
        if not t.is_floating_point():  # BatchNorm's num_batches_tracked
            entry |= {"kind": "int", "value": t.flatten().tolist()}
        elif codes is not None:  # b bits per entry, its step per channel stored beside it
            q_min = int_range(bits, signed=True)[0]
            entry |= {"kind": "levels", "dtype": str(t.dtype).removeprefix("torch."), "bits": bits, "q_min": q_min,
                      "codes": out.add_bits(_to_bits(codes - q_min, bits)), "step": step}
        elif (alpha := sign_magnitudes(t)) is not None:
            nonzero = t != 0
            sparse = not bool(nonzero.all())
            entry |= {"kind": "signs", "dtype": str(t.dtype).removeprefix("torch."),
                      "mask": out.add_bits(nonzero) if sparse else -1,
                      "signs": out.add_bits(t[nonzero] > 0 if sparse else t > 0)}
            entry["alpha"] = -1 if bool((alpha == 1).all()) else out.add_values(alpha.float())[1]
        else:
            nonzero = t != 0
            zeros = t.numel() - int(nonzero.sum())
            if zeros * t.element_size() * 8 > t.numel():  # the mask costs less than the zeros it drops
                dtype, offset = out.add_values(t[nonzero])
                entry |= {"kind": "sparse", "dtype": dtype, "offset": offset, "mask": out.add_bits(nonzero)}
            else:
                dtype, offset = out.add_values(t)
                entry |= {"kind": "dense", "dtype": dtype, "offset": offset}
        layout.append(entry)
    return {"format": FORMAT, "arch": arch, "layout": layout,
            "bits": torch.from_numpy(np.concatenate(out.bits) if out.bits else np.zeros(0, np.uint8)),
            "values": {k: torch.cat(v) for k, v in out.values.items()}}


def _codes(w: torch.Tensor, step: torch.Tensor | None, bits: int) -> torch.Tensor | None:
    """The integers of a weight on a grid (w = codes·step per output channel, codes in the signed `bits`-bit
    range), or None if `w` is not exactly that."""
    if step is None or not w.is_floating_point() or step.numel() != w.shape[0]:
        return None
    s = step.detach().view(-1, *([1] * (w.dim() - 1)))
    codes = torch.round(w.detach() / s)
    q_min, q_max = int_range(bits, signed=True)
    if codes.min() < q_min or codes.max() > q_max or not torch.equal(codes * s, w.detach()):
        return None
    return codes.to(torch.int64)


def _to_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Each value (0 … 2^bits−1) as its `bits` binary digits, lowest first (what `add_bits` packs 8 to a byte)."""
    return ((values.flatten()[:, None] >> torch.arange(bits)) & 1).to(torch.bool)


def save(state: Mapping[str, torch.Tensor], path: str | os.PathLike, arch: dict,
         levels: Mapping[str, tuple[int, str]] | None = None) -> Path:
    """Write `state` packed, with the `arch` record that rebuilds its model (atomically)."""
    return runs.save_torch(path, pack(state, arch, levels))


def nbytes(state: Mapping[str, torch.Tensor], arch: dict, levels: Mapping[str, tuple[int, str]] | None = None) -> int:
    """The size `save` would write."""
    buf = io.BytesIO()
    torch.save(pack(state, arch, levels), buf)
    return buf.getbuffer().nbytes


def load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, arch) of a packed file, loaded with weights_only=True; the tensors are exactly those saved."""
    blob = runs.load_torch(path)
    if not isinstance(blob, dict) or blob.get("format") not in (FORMAT, _LEGACY_BINARY):
        raise runs.RunStoreError(f"{path} is not a resnet-lab packed weights file ({FORMAT})")
    try:
        return _unpack(blob), blob["arch"]
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise runs.RunStoreError(f"{path} is a damaged packed weights file: {type(e).__name__}: {e}") from None


def save_model(model: nn.Module, path: str | os.PathLike, arch: dict) -> Path:
    """Write a float model (plain or in `models.Precision`) packed, with the arch record that rebuilds it."""
    return save(models.unwrap(model).state_dict(), path, arch)


def load_model(path: str | os.PathLike) -> nn.Module:
    """The model of a `save_model` file, rebuilt from its arch record (float32 in, float32 out), in eval mode."""
    state, arch = load(path)
    try:
        model = models.build(arch)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise runs.RunStoreError(f"{path} holds an architecture record that cannot be rebuilt: {e}") from None
    try:
        models.unwrap(model).load_state_dict(state)
    except RuntimeError as e:
        raise runs.RunStoreError(f"{path} does not match its own architecture record: {str(e).splitlines()[0]}") from None
    return model.eval()


def _unpack(blob: dict) -> dict[str, torch.Tensor]:
    bits = blob["bits"].numpy()
    values = blob.get("values") or {"float32": blob["floats"]}  # the legacy files hold one float32 tensor
    state = {}
    for e in blob["layout"]:
        shape, n = e["shape"], int(np.prod(e["shape"], dtype=np.int64))

        def flags(offset: int, count: int) -> torch.Tensor:
            return torch.from_numpy(np.unpackbits(bits[offset: offset + (count + 7) // 8])[:count].astype(bool))

        if e["kind"] == "int":
            state[e["name"]] = torch.tensor(e["value"], dtype=torch.long).view(shape)
        elif e["kind"] in ("signs", "bits"):  # "bits": legacy name (no mask, α in the float32 values)
            mask = flags(e["mask"], n) if e.get("mask", -1) >= 0 else torch.ones(n, dtype=torch.bool)
            signs = flags(e["signs"] if "signs" in e else e["offset"], int(mask.sum())).float() * 2 - 1
            alpha_at = e["alpha"] if "alpha" in e else e["scale_offset"]
            alpha = values["float32"][alpha_at: alpha_at + shape[0]] if alpha_at >= 0 else torch.ones(shape[0])
            w = torch.zeros(n)
            w[mask] = signs
            w = w.view(shape[0], -1) * alpha[:, None]
            state[e["name"]] = w.view(shape).to(getattr(torch, e.get("dtype", "float32")))
        elif e["kind"] == "sparse":
            mask = flags(e["mask"], n)
            v = values[e["dtype"]]
            w = torch.zeros(n, dtype=v.dtype)
            w[mask] = v[e["offset"]: e["offset"] + int(mask.sum())]
            state[e["name"]] = w.view(shape)
        elif e["kind"] == "levels":  # after its step is read: below
            digits = flags(e["codes"], n * e["bits"]).view(n, e["bits"]).to(torch.int64)
            state[e["name"]] = (digits << torch.arange(e["bits"])).sum(1) + e["q_min"]
        else:  # dense, or the legacy "float"
            v = values[e.get("dtype", "float32")]
            state[e["name"]] = v[e["offset"]: e["offset"] + n].view(shape).clone()
    for e in blob["layout"]:
        if e["kind"] == "levels":  # codes times the step of their channel
            step = state[e["step"]]
            state[e["name"]] = (state[e["name"]].to(step.dtype).view(e["shape"]) * step.view(-1, *([1] * (len(e["shape"]) - 1)))
                                ).to(getattr(torch, e["dtype"]))
    return state
