"""Parity with PEFT's ``PsoftConfig`` and ``OFTConfig`` (peft is a test oracle only; the package never imports it).

Every statement below is checked by a test in this file (verified against peft 0.21.2).

PSOFT: ``psoft_vision.PSOFTConfig`` / ``PSOFTAdapter``  vs  ``peft.PsoftConfig`` / ``peft.tuners.psoft.layer.Linear``

===========================  ======================================  ===============================================
what                         psoft_vision                            PEFT
===========================  ======================================  ===============================================
rank, targets                ``rank=r``, ``targets=[...]``           ``r=r``, ``target_modules=[...]``
packed generator q           ``adapter.q[c]``, (chunks, r(r-1)/2)    ``psoft_R[name].weight``, (r(r-1)/2,)
Q from q                     ``Q[i,j] = q_k`` for i<j, row-major     same (``triu_indices(r, r, 1)``, ``Q - Q^T``)
                             strict upper triangle, ``Q = U - U^T``  -> q maps to q unchanged
input-side scale             ``alpha`` (``scale_a``)                 ``vector_a`` (``psoft_mag_a``)
output-side scale            ``beta`` (``scale_b``)                  ``vector_b`` (``psoft_mag_b``)
C                            ``diag(beta) R diag(alpha)``            ``psoft_R[name].get_matrix()`` (same)
exact R                      ``(I+Q)(I-Q)^{-1}``                     ``solve(I-Q, I+Q, left=False)``: the same
Neumann R                    ``neumann_terms=K``:                    ``use_cayley_neumann=True``,
                             ``(I+Q)(I+Q+...+Q^K)``                  ``num_cayley_neumann_terms=t``:
                             ``= I+2Q+...+2Q^K+Q^(K+1)``             ``I+2Q+...+2Q^(t-2)+Q^(t-1)`` (t >= 4)
                                                                     => **t = K + 2** (not K + 1)
A (r, in)                    ``adapter.A = V_r^T``                   ``_psoft_A_cache[name] = V_r^T``
B (out, r)                   ``adapter.B[c] = U_r diag(S_r)``        ``_psoft_B_cache[name] = U_r diag(S_r)/scaling``
psoft_alpha                  (none: nothing to scale)                ``scaling = psoft_alpha / r`` divides the B cache
                                                                     and multiplies the adapter output: it cancels,
                                                                     so copy ``B_peft = B / scaling``
SVD signs                    canonical: largest abs entry of each    raw ``torch.linalg.svd`` signs: with
                             column of U_r positive                  ``d = +-1`` per pair, ``A_peft = d A``,
                                                                     ``B_peft = B d / scaling``; keeping PEFT's own
                                                                     caches, map ``q_k -> d_i d_j q_k``
forward                      ``base(x) + (x A^T)(C - I)^T B^T``      ``base(x) + scaling ((xA^T) C^T - xA^T) B_peft^T``
===========================  ======================================  ===============================================

Neumann term counting in PEFT (same code in PSOFT and OFT): t <= 1 gives ``I`` (the adapter does nothing), t = 2 gives
``I + 2Q`` (no psoft_vision equivalent), t = 3 and t = 4 both give ``I+2Q+2Q^2+Q^3`` (our K = 2), then t = K + 2.
PEFT's default t = 5 is our K = 3, an odd K (``R^T R - I`` only of order ``||Q||^4``; see
:mod:`psoft_vision.orthogonal`). Our K = 1 has no PEFT equivalent. Our Neumann branch switches to the exact solve
once some ``||Q||_F >= 0.5``; PEFT never does (PSOFT's ``cayley_neumann_eps`` rescales Q instead, default off), so
parity of the Neumann branches needs ``||Q||_F < 0.5`` for every block and ``cayley_neumann_eps=None``.

OFTv2: ``psoft_vision.OFTConfig`` / ``OFTAdapter``  vs  ``peft.OFTConfig`` / ``peft.tuners.oft.layer.Linear``

===========================  ======================================  ===============================================
what                         psoft_vision                            PEFT
===========================  ======================================  ===============================================
block size                   ``block_size=b`` (refuses a b that      ``oft_block_size=b, r=0`` (r = number of blocks;
                             does not divide ``in``)                 a non-dividing b is adjusted, with a warning)
Neumann / exact              ``neumann_terms=K`` / ``None``          ``use_cayley_neumann=True, t=K+2`` / ``False``
defaults                     K = 4                                   t = 5, i.e. our K = 3
packed generator             ``adapter.q``, (in/b, b(b-1)/2)         ``oft_R[name].weight``, (in/b, b(b-1)/2),
                                                                     same triangle order
rotation of x (row vector)   ``x_blk -> x_blk R^T``, merged          ``x_blk -> x_blk M`` (``"...rk,rkc->...rc"``),
                             ``W' = W R``                            merged ``W' = W M^T``: equal iff ``M = R^T``
PEFT Neumann branch          ``R = cayley(Q)`` (either branch)       ``M ~ (I+Q')(I-Q')^{-1}`` -> **q_peft = -q**
PEFT exact branch                                                    ``M = (I-Q')(I+Q')^{-1} = cayley(Q')^T``
                                                                     -> **q_peft = +q**
===========================  ======================================  ===============================================

So PEFT's OFT rotates in opposite directions in its two branches for the same weights (its exact branch is the
transpose of what its Neumann branch approximates), while ours never flips when the branch changes. Because PEFT
also applies ``x M`` where we apply ``x R^T``, it is PEFT's *Neumann* branch that needs the sign flip to match us,
and its exact branch that maps q unchanged.

Trainable parameters per layer: PSOFT ``r(r-1)/2 + 2r``, OFT ``(in/b) * b(b-1)/2``, the same in both libraries.
"""

import copy
import math
from collections import OrderedDict

import peft  # the dev extra installs it: a missing oracle must fail, not skip
import pytest
import torch
from peft.tuners.oft.layer import OFTRotationModule
from peft.tuners.psoft.layer import OrthLayer
from torch import nn

import psoft_vision as pv
from psoft_vision.orthogonal import cayley, cayley_neumann, packed_size, skew_from_packed

IN, HIDDEN, OUT = 64, 96, 48
TARGETS = ["fc1", "fc2"]
RANK = 8
PSOFT_ALPHA = 12  # non-default (PEFT's default is 32): scaling = 12 / 8 = 1.5
BLOCK = 8
# ||Q||_F per chunk / block: below psoft_vision's Neumann guard (0.5), yet large enough to tell neighbouring K apart
Q_NORM = 0.45
TOL = 1e-5


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def well_separated(shape, gen) -> torch.Tensor:
    """A weight with singular values 0.9^i: its singular vectors are defined to ~1e-6 in fp32, so the two
    libraries' SVD routines (ours runs LAPACK on the tall orientation) agree to far below the test tolerance.
    On random weights two fp32 SVD paths differ by up to ~4e-5 from each other and from an fp64 SVD."""
    out_features, in_features = shape
    u, _ = torch.linalg.qr(torch.randn(out_features, out_features, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=gen, dtype=torch.float64))
    k = min(shape)
    s = 0.9 ** torch.arange(k, dtype=torch.float64)
    return (u[:, :k] * s) @ v[:, :k].T


def make_base() -> nn.Module:
    gen = torch.Generator().manual_seed(1234)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(IN, HIDDEN), act=nn.GELU(), fc2=nn.Linear(HIDDEN, OUT)))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(well_separated(p.shape, gen) if p.ndim == 2 else torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def inputs() -> torch.Tensor:
    return torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(99))


def random_packed(rows: int, size: int, seed: int) -> torch.Tensor:
    """Packed q with ||Q||_F = Q_NORM for every row (||Q||_F = sqrt(2) ||q||)."""
    q = torch.randn(rows, packed_size(size), generator=torch.Generator().manual_seed(seed))
    return q / q.norm(dim=-1, keepdim=True) * (Q_NORM / math.sqrt(2))


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --- the two libraries' models --------------------------------------------------------------------------------------


def ours_psoft(base: nn.Module, neumann_terms: int | None = None) -> nn.Module:
    config = pv.PSOFTConfig(rank=RANK, targets=TARGETS, neumann_terms=neumann_terms)
    return pv.inject(copy.deepcopy(base), config).eval()


def peft_psoft(base: nn.Module, terms: int | None = None) -> nn.Module:
    config = peft.PsoftConfig(
        r=RANK,
        target_modules=TARGETS,
        psoft_alpha=PSOFT_ALPHA,
        use_cayley_neumann=terms is not None,
        num_cayley_neumann_terms=terms if terms is not None else 5,
    )
    return peft.get_peft_model(copy.deepcopy(base), config).eval()


def ours_oft(base: nn.Module, neumann_terms: int | None = None, block: int = BLOCK) -> nn.Module:
    config = pv.OFTConfig(block_size=block, targets=TARGETS, neumann_terms=neumann_terms)
    return pv.inject(copy.deepcopy(base), config).eval()


def peft_oft(base: nn.Module, terms: int | None = None, block: int = BLOCK) -> nn.Module:
    config = peft.OFTConfig(
        oft_block_size=block,
        r=0,
        target_modules=TARGETS,
        use_cayley_neumann=terms is not None,
        num_cayley_neumann_terms=terms if terms is not None else 5,
    )
    return peft.get_peft_model(copy.deepcopy(base), config).eval()


def our_adapter(model: nn.Module, name: str):
    return model.get_submodule(name).adapters["default"]


def peft_layer(model: nn.Module, name: str):
    return model.get_submodule(f"base_model.model.{name}")


def randomize_psoft(ours: nn.Module, theirs: nn.Module, *, copy_ab: bool = True) -> None:
    """Random q, alpha, beta in ours, mapped into PEFT. ``copy_ab``: our A, B into PEFT's caches (B / scaling);
    otherwise PEFT keeps its own SVD and q is mapped through the sign differences of the singular pairs."""
    with torch.no_grad():
        for i, name in enumerate(TARGETS):
            adapter, layer = our_adapter(ours, name), peft_layer(theirs, name)
            gen = torch.Generator().manual_seed(10 + i)
            adapter.q.copy_(random_packed(1, RANK, seed=20 + i))
            adapter.alpha.copy_(1 + 0.2 * torch.randn(adapter.alpha.shape, generator=gen))
            adapter.beta.copy_(1 + 0.2 * torch.randn(adapter.beta.shape, generator=gen))

            scaling = layer.scaling["default"]
            assert scaling == PSOFT_ALPHA / RANK
            orth = layer.psoft_R["default"]
            orth.vector_a.copy_(adapter.alpha[0])
            orth.vector_b.copy_(adapter.beta[0])
            if copy_ab:
                layer._psoft_A_cache["default"] = adapter.A.clone()
                layer._psoft_B_cache["default"] = adapter.B[0] / scaling
                orth.weight.copy_(adapter.q[0])
            else:
                signs = pair_signs(adapter, layer)
                rows, cols = torch.triu_indices(RANK, RANK, 1)
                orth.weight.copy_(adapter.q[0] * signs[rows] * signs[cols])


def pair_signs(adapter, layer) -> torch.Tensor:
    """d (r,) with PEFT's A = d * our A (each singular pair's sign)."""
    return torch.sign((layer._psoft_A_cache["default"] * adapter.A).sum(dim=1))


def randomize_oft(ours: nn.Module, theirs: nn.Module, peft_sign: float) -> None:
    with torch.no_grad():
        for i, name in enumerate(TARGETS):
            adapter, layer = our_adapter(ours, name), peft_layer(theirs, name)
            adapter.q.copy_(random_packed(adapter.blocks, BLOCK, seed=30 + i))
            layer.oft_R["default"].weight.copy_(peft_sign * adapter.q)


def merged_weights(ours: nn.Module, theirs: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pv.merge(ours)
    unloaded = theirs.merge_and_unload()
    return [(ours.get_submodule(n).weight.detach(), unloaded.get_submodule(n).weight.detach()) for n in TARGETS]


# --- 1. trainable parameters ----------------------------------------------------------------------------------------


def test_psoft_trainable_parameters_per_layer_match():
    base = make_base()
    ours, theirs = ours_psoft(base), peft_psoft(base)
    expected = RANK * (RANK - 1) // 2 + 2 * RANK
    for name in TARGETS:
        adapter, orth = our_adapter(ours, name), peft_layer(theirs, name).psoft_R["default"]
        assert trainable(adapter) == expected
        assert trainable(orth) == expected
        assert adapter.q.shape == (1, packed_size(RANK)) and orth.weight.shape == (packed_size(RANK),)
        assert adapter.alpha.shape == (1, RANK) and orth.vector_a.shape == (RANK,)
        assert adapter.beta.shape == (1, RANK) and orth.vector_b.shape == (RANK,)
    assert trainable(ours) == theirs.get_nb_trainable_parameters()[0] == len(TARGETS) * expected


@pytest.mark.parametrize("block", [8, 16, 32])
def test_oft_trainable_parameters_per_layer_match(block):
    base = make_base()
    ours, theirs = ours_oft(base, block=block), peft_oft(base, block=block)
    total = 0
    for name in TARGETS:
        width = base.get_submodule(name).in_features
        expected = (width // block) * block * (block - 1) // 2
        adapter, layer = our_adapter(ours, name), peft_layer(theirs, name)
        assert trainable(adapter) == trainable(layer.oft_R["default"]) == expected
        assert adapter.q.shape == layer.oft_R["default"].weight.shape == (width // block, packed_size(block))
        assert layer.r["default"] == width // block and layer.oft_block_size["default"] == block
        total += expected
    assert trainable(ours) == theirs.get_nb_trainable_parameters()[0] == total


# --- the conventions, matrix by matrix ------------------------------------------------------------------------------


@pytest.mark.parametrize("terms", range(1, 9))
def test_peft_neumann_term_count_is_our_k_plus_two(terms):
    q = random_packed(1, RANK, seed=5)
    skew = skew_from_packed(q[0], RANK)
    orth = OrthLayer(RANK, mag_a=False, mag_b=False, use_cayley_neumann=True, num_cayley_neumann_terms=terms)
    rot = OFTRotationModule(1, packed_size(RANK), RANK, RANK, num_cayley_neumann_terms=terms)
    with torch.no_grad():
        orth.weight.copy_(q[0])
        rot.weight.copy_(q)
    psoft_r, oft_r = orth.get_matrix(), rot.get_weight()
    if terms <= 1:
        expected = torch.eye(RANK)
    elif terms == 2:
        expected = torch.eye(RANK) + 2 * skew
    else:
        expected = cayley_neumann(skew, max(terms - 2, 2))  # t = 3 repeats t = 4
    torch.testing.assert_close(psoft_r, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(oft_r, expected, rtol=0, atol=1e-6)
    if 4 <= terms <= 7:  # the K = t - 1 reading is wrong (t = 3 only by accident of the repeat)
        assert (psoft_r - cayley_neumann(skew, terms - 1)).abs().max() > 1e-5


def test_peft_exact_branches_orientation():
    q = random_packed(1, RANK, seed=6)
    skew = skew_from_packed(q[0], RANK)
    orth = OrthLayer(RANK, mag_a=False, mag_b=False, use_cayley_neumann=False)
    rot = OFTRotationModule(1, packed_size(RANK), RANK, RANK, use_cayley_neumann=False)
    with torch.no_grad():
        orth.weight.copy_(q[0])
        rot.weight.copy_(q)
    exact = cayley(skew)
    assert (exact - exact.T).abs().max() > 1e-2
    torch.testing.assert_close(orth.get_matrix(), exact, rtol=0, atol=1e-6)  # PSOFT: (I+Q)(I-Q)^-1
    torch.testing.assert_close(rot.get_weight(), exact.T, rtol=0, atol=1e-6)  # OFT: (I-Q)(I+Q)^-1


def test_peft_psoft_subspace_is_ours_up_to_pair_signs_and_scaling():
    base = make_base()
    ours, theirs = ours_psoft(base), peft_psoft(base)
    for name in TARGETS:
        adapter, layer = our_adapter(ours, name), peft_layer(theirs, name)
        signs = pair_signs(adapter, layer)
        assert signs.abs().min() == 1
        scaling = PSOFT_ALPHA / RANK
        torch.testing.assert_close(layer._psoft_A_cache["default"], signs[:, None] * adapter.A, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            layer._psoft_B_cache["default"] * scaling, adapter.B[0] * signs, rtol=1e-5, atol=1e-5
        )


# --- 2. same outputs with equivalent parameters ---------------------------------------------------------------------


@pytest.mark.parametrize("neumann_terms", [None, 2, 3, 4], ids=lambda k: "exact" if k is None else f"K{k}")
def test_psoft_outputs_match(neumann_terms):
    base = make_base()
    ours = ours_psoft(base, neumann_terms)
    theirs = peft_psoft(base, None if neumann_terms is None else neumann_terms + 2)
    randomize_psoft(ours, theirs)
    x = inputs()
    with torch.no_grad():
        ref, out, peft_out = base(x), ours(x), theirs(x)
    assert rel_err(out, ref) > 1e-2  # the adapters do change the function
    assert rel_err(peft_out, out) <= TOL
    for w_ours, w_peft in merged_weights(ours, theirs):
        assert rel_err(w_peft, w_ours) <= TOL


def test_psoft_outputs_match_with_peft_own_subspace():
    """No cache copying: PEFT's own SVD, q mapped through the sign of each singular pair."""
    base = make_base()
    ours, theirs = ours_psoft(base), peft_psoft(base)
    randomize_psoft(ours, theirs, copy_ab=False)
    x = inputs()
    with torch.no_grad():
        out, peft_out = ours(x), theirs(x)
    assert rel_err(peft_out, out) <= TOL


@pytest.mark.parametrize("neumann_terms", [3, 4])
def test_psoft_neumann_off_by_one_terms_do_not_match(neumann_terms):
    """The parity test discriminates: t = K + 1 (e.g. PEFT's default t = 5 against our default K = 4) differs."""
    base = make_base()
    ours = ours_psoft(base, neumann_terms)
    theirs = peft_psoft(base, neumann_terms + 1)
    randomize_psoft(ours, theirs)
    x = inputs()
    with torch.no_grad():
        assert rel_err(theirs(x), ours(x)) > 100 * TOL


@pytest.mark.parametrize(
    ("neumann_terms", "peft_sign"),
    [(None, 1.0), (2, -1.0), (3, -1.0), (4, -1.0)],
    ids=["exact-same-q", "K2-negated-q", "K3-negated-q", "K4-negated-q"],
)
def test_oft_outputs_match(neumann_terms, peft_sign):
    base = make_base()
    ours = ours_oft(base, neumann_terms)
    theirs = peft_oft(base, None if neumann_terms is None else neumann_terms + 2)
    randomize_oft(ours, theirs, peft_sign)
    x = inputs()
    with torch.no_grad():
        ref, out, peft_out = base(x), ours(x), theirs(x)
    assert rel_err(out, ref) > 1e-2
    assert rel_err(peft_out, out) <= TOL
    for w_ours, w_peft in merged_weights(ours, theirs):
        assert rel_err(w_peft, w_ours) <= TOL


@pytest.mark.parametrize("neumann_terms", [None, 4], ids=["exact", "K4"])
def test_oft_wrong_sign_does_not_match(neumann_terms):
    """The opposite sign (PEFT rotating the other way) is far off: the sign in the table is not a no-op."""
    base = make_base()
    ours = ours_oft(base, neumann_terms)
    theirs = peft_oft(base, None if neumann_terms is None else neumann_terms + 2)
    randomize_oft(ours, theirs, 1.0 if neumann_terms is not None else -1.0)
    x = inputs()
    with torch.no_grad():
        assert rel_err(theirs(x), ours(x)) > 1e-2


# --- 3. identity at init --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("neumann_terms", [None, 4], ids=["exact", "K4"])
def test_psoft_identity_at_init_in_both(neumann_terms):
    base = make_base()
    ours = ours_psoft(base, neumann_terms)
    theirs = peft_psoft(base, None if neumann_terms is None else neumann_terms + 2)
    for name in TARGETS:
        adapter, orth = our_adapter(ours, name), peft_layer(theirs, name).psoft_R["default"]
        assert not adapter.q.any() and not orth.weight.any()
        assert (adapter.alpha == 1).all() and (adapter.beta == 1).all()
        assert (orth.vector_a == 1).all() and (orth.vector_b == 1).all()
    x = inputs()
    with torch.no_grad():
        ref = base(x)
        assert torch.equal(ours(x), ref)
        assert torch.equal(theirs(x), ref)


@pytest.mark.parametrize("neumann_terms", [None, 4], ids=["exact", "K4"])
def test_oft_identity_at_init_in_both(neumann_terms):
    base = make_base()
    ours = ours_oft(base, neumann_terms)
    theirs = peft_oft(base, None if neumann_terms is None else neumann_terms + 2)
    for name in TARGETS:
        assert not our_adapter(ours, name).q.any() and not peft_layer(theirs, name).oft_R["default"].weight.any()
    x = inputs()
    with torch.no_grad():
        ref = base(x)
        assert torch.equal(ours(x), ref)
        assert torch.equal(theirs(x), ref)
