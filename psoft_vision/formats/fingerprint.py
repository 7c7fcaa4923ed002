"""Fingerprints of base weights: an adapter file remembers the weights it was trained on, and loading it onto other
weights fails loudly.

A fingerprint holds the weight's shape, its Frobenius norm and eight seeded bilinear probes ``u^T W v / ||W||_F``
(``u``, ``v`` standard normal, drawn from a generator seeded by the probe index). Each probe of a generic weight is
about N(0, 1), so another checkpoint, a re-initialisation, a permutation of rows or columns or a flip of signs
moves every probe by O(1), while a copy of the same weights in another floating dtype moves them by its rounding
error (bf16: about 1e-3). Probes count as equal within :data:`PROBE_TOLERANCE`, the norm within
:data:`NORM_TOLERANCE` (relative); any NaN or infinity is a mismatch. Cost: one pass over the weight in fp32,
about 2 ms for a 768 x 3072 layer on one CPU core.
"""

import math

import torch

VERSION = 2
PROBES = 8
PROBE_TOLERANCE = 1e-2
NORM_TOLERANCE = 1e-2
_V1_TOLERANCE = 1e-2  # files written by psoft_vision 0.1: four probes scaled by 1 / sqrt(out * in)


def fingerprint(weight: torch.Tensor) -> dict:
    """The fingerprint of a weight (any floating dtype; convolution kernels are flattened to 2-D)."""
    w = weight.detach().to("cpu", torch.float32).flatten(1)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(PROBES, w.shape[0], generator=gen)
    v = torch.randn(PROBES, w.shape[1], generator=gen)
    norm = w.norm()
    probes = ((u @ w) * v).sum(-1) / norm.clamp_min(torch.finfo(torch.float32).tiny)
    return {"version": VERSION, "shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch."),
            "norm": norm.item(), "probes": probes.tolist()}


def _fingerprint_v1(weight: torch.Tensor) -> dict:
    w = weight.detach().to("cpu", torch.float64).flatten(1)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(4, w.shape[0], generator=gen, dtype=torch.float64)
    v = torch.randn(4, w.shape[1], generator=gen, dtype=torch.float64)
    return {"norm": w.norm().item(), "sketch": (((u @ w) * v).sum(-1) / (w.shape[0] * w.shape[1]) ** 0.5).tolist()}


def mismatch(saved: dict, weight: torch.Tensor) -> str | None:
    """Why ``weight`` is not the weight ``saved`` was taken of, or None when it is (up to a change of dtype)."""
    if list(saved.get("shape", [])) != list(weight.shape):
        return f"shape {tuple(weight.shape)} instead of {tuple(saved.get('shape', []))}"
    if saved.get("version") != VERSION:
        current = _fingerprint_v1(weight)
        pairs = list(zip([saved["norm"], *saved["sketch"]], [current["norm"], *current["sketch"]], strict=True))
        scale = max(abs(saved["norm"]), 1e-12)
        bad = any(not (math.isfinite(a) and math.isfinite(b)) or abs(a - b) > _V1_TOLERANCE * scale for a, b in pairs)
        return "other values" if bad else None
    current = fingerprint(weight)
    values = [saved["norm"], *saved["probes"], current["norm"], *current["probes"]]
    if not all(math.isfinite(x) for x in values):
        return "NaN or infinite values"
    if abs(current["norm"] - saved["norm"]) > NORM_TOLERANCE * max(abs(saved["norm"]), 1e-12):
        return f"norm {current['norm']:.6g} instead of {saved['norm']:.6g}"
    worst = max(abs(a - b) for a, b in zip(saved["probes"], current["probes"], strict=True))
    if worst > PROBE_TOLERANCE:
        return f"other values (a probe moved by {worst:.3g})"
    return None
