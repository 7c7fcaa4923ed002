"""Orthogonal matrices from packed skew-symmetric parameters, shared by PSOFT and OFTv2.

One orientation everywhere: ``R = (I + Q)(I - Q)^{-1}`` with ``Q[i, j] = q_k`` for ``i < j`` (row-major order
of the strict upper triangle) and ``Q[j, i] = -q_k``. The Neumann branch approximates this same matrix, so
swapping branches never flips the rotation.

Truncating ``(I - Q)^{-1}`` after ``Q^K`` gives ``R_K = R (I - Q^{K+1})``, hence

    R_K^T R_K = I - Q^{2K+2}                  for even K,
    R_K^T R_K = I - 2 Q^{K+1} + Q^{2K+2}      for odd K,

so an even K is both cheaper and far more orthogonal than the odd K above it. The series diverges for
``||Q|| >= 1``; :func:`orthogonal_from_packed` uses the exact solve whenever ``||Q||_F`` reaches
:data:`NEUMANN_MAX_NORM`.
"""

from functools import cache

import torch

from .tracing import is_tracing

#: Above this Frobenius norm of Q the Neumann series is replaced by the exact solve.
#: At the bound the truncation error ``||Q||^{K+1}`` is 0.5^5 ~= 3% for K=4, shrinking fast below it.
NEUMANN_MAX_NORM = 0.5


def packed_size(size: int) -> int:
    """Number of free entries of a ``size x size`` skew-symmetric matrix."""
    return size * (size - 1) // 2


@cache
def _upper_flat_index(size: int, device: torch.device) -> torch.Tensor:
    # Made outside inference mode even when first asked for inside it: the cached tensor also serves training,
    # and autograd refuses to save an inference tensor.
    with torch.inference_mode(False):
        rows, cols = torch.triu_indices(size, size, offset=1, device=device)
        return rows * size + cols


def skew_from_packed(q: torch.Tensor, size: int) -> torch.Tensor:
    """``(..., size(size-1)/2) -> (..., size, size)`` skew-symmetric matrices."""
    upper = q.new_zeros(q.shape[:-1] + (size * size,))  # not *q.shape: torch.fx cannot unpack a Proxy's shape
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


def orthogonal_from_packed(q: torch.Tensor, size: int, neumann_terms: int | None = None) -> torch.Tensor:
    """Orthogonal ``(..., size, size)`` matrices in fp32 from packed parameters ``q``.

    ``neumann_terms=None`` is the exact Cayley transform; an integer K uses the series up to ``Q^K`` while
    every ``||Q||_F`` is below :data:`NEUMANN_MAX_NORM`, and the exact transform otherwise.
    """
    skew = skew_from_packed(q.float(), size)
    if neumann_terms is None:
        return cayley(skew)
    # ||Q||_F = sqrt(2) ||q||: checked on the packed vector, one small reduction per layer and step.
    too_large = (q.detach().float().norm(dim=-1) * 2**0.5 >= NEUMANN_MAX_NORM).any()
    if torch.compiler.is_compiling() or is_tracing():
        # A Python branch on a tensor's value would break torch.compile's graph (and torch.fx has no value to branch
        # on), and torch.cond's backward fails under AOTAutograd (torch 2.14): both transforms are computed and the
        # one the norm picks is kept.
        return torch.where(too_large, cayley(skew), cayley_neumann(skew, neumann_terms))
    if bool(too_large):
        return cayley(skew)
    return cayley_neumann(skew, neumann_terms)
