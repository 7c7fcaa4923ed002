import pytest
import torch

from psoft_vision.orthogonal import (
    NEUMANN_MAX_NORM,
    _upper_flat_index,
    cayley,
    cayley_neumann,
    orthogonal_from_packed,
    packed_size,
    skew_from_packed,
)


def test_packing_is_row_major_upper_triangle():
    q = torch.arange(1.0, 7.0)
    skew = skew_from_packed(q, 4)
    assert torch.equal(skew, -skew.T)
    assert skew[0, 1] == 1 and skew[0, 3] == 3 and skew[1, 2] == 4 and skew[2, 3] == 6
    assert packed_size(4) == 6 and packed_size(46) == 1035


def test_exact_cayley_is_orthogonal_with_the_documented_orientation():
    skew = skew_from_packed(torch.randn(3, packed_size(8)), 8)
    r = cayley(skew)
    eye = torch.eye(8)
    assert torch.allclose(r.mT @ r, eye.expand_as(r), atol=1e-5)
    # (I + Q)(I - Q)^{-1}, not its transpose
    assert torch.allclose(r, (eye + skew) @ torch.linalg.inv(eye - skew), atol=1e-5)
    assert not torch.allclose(r, r.mT, atol=1e-3)


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 6])
def test_neumann_orthogonality_error_has_the_predicted_order(terms):
    """R_K^T R_K - I is O(|Q|^(2K+2)) for even K and O(|Q|^(K+1)) for odd K: halving Q divides it by 2^order."""
    base = skew_from_packed(torch.randn(packed_size(16), dtype=torch.float64), 16)
    base = base / torch.linalg.matrix_norm(base, ord=2)

    def error(scale):
        r = cayley_neumann(base * scale, terms)
        return torch.linalg.matrix_norm(r.T @ r - torch.eye(16, dtype=torch.float64), ord=2).item()

    order = 2 * terms + 2 if terms % 2 == 0 else terms + 1
    ratio = error(0.2) / error(0.1)
    assert ratio == pytest.approx(2**order, rel=0.15)


def test_neumann_approximates_the_same_matrix_as_the_exact_branch():
    """R_K = R (I - Q^{K+1}), so ||R_K - R||_2 <= ||Q||_2^{K+1}."""
    skew = skew_from_packed(torch.randn(packed_size(8), dtype=torch.float64), 8) * 0.05
    exact = cayley(skew)
    norm = torch.linalg.matrix_norm(skew, ord=2).item()
    for terms in (1, 2, 4, 8):
        gap = torch.linalg.matrix_norm(cayley_neumann(skew, terms) - exact, ord=2).item()
        assert gap <= norm ** (terms + 1) * (1 + 1e-9)
        assert gap >= norm ** (terms + 1) * 0.5
    # the transpose is far away: the branches agree on orientation
    assert (cayley_neumann(skew, 4) - exact.T).abs().max() > 1e-2


def test_even_terms_are_more_orthogonal_than_the_next_odd():
    q = torch.randn(packed_size(32), dtype=torch.float64) * 0.01
    skew = skew_from_packed(q, 32)

    def err(k):
        r = cayley_neumann(skew, k)
        return (r.T @ r - torch.eye(32, dtype=torch.float64)).abs().max().item()

    assert err(4) < err(5)


def test_guard_falls_back_to_exact_near_unit_norm():
    q = torch.randn(packed_size(8))
    q = q / q.norm() * (NEUMANN_MAX_NORM / 2**0.5) * 1.5  # ||Q||_F = 1.5 x the bound
    r = orthogonal_from_packed(q, 8, neumann_terms=2)
    assert torch.allclose(r, cayley(skew_from_packed(q, 8)), atol=1e-6)
    assert torch.allclose(r.T @ r, torch.eye(8), atol=1e-5)
    small = q * 0.1
    assert not torch.equal(orthogonal_from_packed(small, 8, 2), cayley(skew_from_packed(small, 8)))


def test_gradients_flow_through_both_branches():
    for terms in (None, 4):
        q = torch.zeros(2, packed_size(6), requires_grad=True)
        orthogonal_from_packed(q, 6, terms)[..., 0, 1].sum().backward()
        assert q.grad.abs().sum() > 0


def test_a_first_call_in_inference_mode_leaves_training_working():
    """The packing index is cached per size; made inside torch.inference_mode it was an inference tensor, which
    autograd refuses to save, so training after an inference-mode preview (the app's) failed."""
    _upper_flat_index.cache_clear()
    with torch.inference_mode():
        orthogonal_from_packed(torch.zeros(packed_size(5)), 5)
    q = torch.zeros(packed_size(5), requires_grad=True)
    orthogonal_from_packed(q, 5, neumann_terms=4).sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape
