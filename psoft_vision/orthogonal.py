"""Orthogonal matrices from packed skew-symmetric parameters, shared by PSOFT and OFTv2.

One orientation everywhere: ``R = (I + Q)(I - Q)^{-1}`` with ``Q[i, j] = q_k`` for ``i < j`` (row-major order
of the strict upper triangle) and ``Q[j, i] = -q_k``. The Neumann branch approximates this same matrix, so
swapping branches never flips the rotation.

Truncating ``(I - Q)^{-1}`` after ``Q^K`` gives ``R_K = R (I - Q^{K+1})``, hence

    R_K^T R_K = I - Q^{2K+2}                  for even K,
    R_K^T R_K = I - 2 Q^{K+1} + Q^{2K+2}      for odd K,

so an even K is both cheaper and far more orthogonal than the odd K above it. The series diverges for
``||Q|| >= 1``; :func:`orthogonal_from_packed` uses the exact solve for a layer whenever the ``||Q||_F`` of one of its
blocks reaches :data:`NEUMANN_MAX_NORM`. That choice is made on the device (both transforms are computed and one is
kept), because a Python branch on the norm would wait for the device at every layer of every step.
"""

import functools

import torch

from .tracing import fx_tracing

#: Above this Frobenius norm of Q the Neumann series is replaced by the exact solve.
#: At the bound the truncation error ``||Q||^{K+1}`` is 0.5^5 ~= 3% for K=4, shrinking fast below it.
NEUMANN_MAX_NORM = 0.5


def packed_size(size: int) -> int:
    """Number of free entries of a ``size x size`` skew-symmetric matrix."""
    return size * (size - 1) // 2


def _cached_per_device(build):
    """``functools.cache`` for index tensors keyed by a device, bypassed while torch.fx traces: the device is then a
    Proxy, a new key at every trace, which the cache would keep alive with the whole traced graph."""
    cached = functools.cache(build)

    @functools.wraps(build)
    def get(*key):
        return build(*key) if fx_tracing() else cached(*key)
    get.cache_clear = cached.cache_clear
    return get


@_cached_per_device
def _upper_flat_index(size: int, device: torch.device) -> torch.Tensor:
    # Made outside inference mode even when first asked for inside it: the cached tensor also serves training,
    # and autograd refuses to save an inference tensor.
    with torch.inference_mode(False):
        rows, cols = torch.triu_indices(size, size, offset=1, device=device)
        return rows * size + cols


@_cached_per_device
def _segment_index(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                       torch.tensor(lengths, device=device), output_size=sum(lengths))


def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Tensors concatenated along their first dimension, as the adapters of a batch stack their parameters (one
    tensor as it is: a cat would copy it)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def split_rows(tensor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """``tensor`` split along its first dimension into parts of ``sizes`` rows: the inverse of :func:`stacked` (one
    part as it is, so that a single adapter's own computation never iterates a tensor: torch.fx cannot)."""
    return [tensor] if len(sizes) == 1 else list(tensor.split(sizes))


def skew_from_packed(q: torch.Tensor, size: int) -> torch.Tensor:
    """``(..., size(size-1)/2) -> (..., size, size)`` skew-symmetric matrices."""
    upper = q.new_zeros(q.shape[:-1] + (size * size,))
    upper = upper.index_copy(-1, _upper_flat_index(size, q.device), q).unflatten(-1, (size, size))
    return upper - upper.mT


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform ``(I + Q)(I - Q)^{-1}`` (the factors commute), by a linear solve.

    ``I - Q`` of a real skew-symmetric Q is always invertible (its eigenvalues are ``1 - i lambda``), so the solve
    runs without its singularity check, which on a GPU would wait for the device at every layer of every step."""
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device)
    return torch.linalg.solve_ex(eye - skew, eye + skew, check_errors=False).result


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """``(I + Q)(I + Q + ... + Q^terms)``: the Cayley transform with a truncated Neumann series."""
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device)
    series = eye
    for _ in range(terms):  # Horner: I + Q(I + Q(...))
        series = eye + skew @ series
    return series + skew @ series


def _too_large(q: torch.Tensor, segments: tuple[int, ...] | None) -> torch.Tensor:
    """Whether the Neumann series must give way to the exact solve: for ``q`` (n, packed), one flag for all n rows,
    or with ``segments`` (row counts summing to n) a flag per segment, repeated over its rows, shape (n, 1, 1)."""
    # ||Q||_F = sqrt(2) ||q||: checked on the packed vectors, one small reduction for all of them.
    norms = q.detach().float().norm(dim=-1)
    if segments is None:
        return norms.max() * 2**0.5 >= NEUMANN_MAX_NORM
    index = _segment_index(segments, q.device)
    largest = norms.new_zeros(len(segments)).scatter_reduce(0, index, norms, "amax")
    return (largest * 2**0.5 >= NEUMANN_MAX_NORM)[index][:, None, None]


def orthogonal_from_packed(q: torch.Tensor, size: int, neumann_terms: int | None = None,
                           segments: tuple[int, ...] | None = None) -> torch.Tensor:
    """Orthogonal ``(..., size, size)`` matrices in fp32 from packed parameters ``q``.

    ``neumann_terms=None`` is the exact Cayley transform; an integer K uses the series up to ``Q^K`` while every
    ``||Q||_F`` is below :data:`NEUMANN_MAX_NORM`, and the exact transform otherwise. Every row of ``q`` (n, packed)
    falls back together, or with ``segments`` (the row counts of the layers stacked in ``q``) each layer's rows.
    """
    skew = skew_from_packed(q.float(), size)
    if neumann_terms is None:
        return cayley(skew)
    return torch.where(_too_large(q, segments), cayley(skew), cayley_neumann(skew, neumann_terms))
