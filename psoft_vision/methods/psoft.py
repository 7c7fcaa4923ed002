"""PSOFT: orthogonal fine-tuning inside the principal subspace of each pretrained weight.

With the top-r SVD ``W = U S V^T + W_res``, ``A = V_r^T`` and ``B = U_r S_r`` are frozen and

    W' = W_res + B C A,     C = diag(beta) R diag(alpha),     R = cayley(Q),

so the forward is ``y = base(x) + (x A^T) (B (C - I))^T``: the frozen layer runs untouched and the adapter adds
an r-wide path that is exactly zero at init (Q = 0, alpha = beta = 1). A Conv2d is viewed as
``(out, in * kh * kw)``: A becomes a conv with r output channels and the layer's kernel and stride, and
``B (C - I)`` a 1x1 conv.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import Adapter, Inner, compute_dtype, fp32, merge_precision
from ..bases import Base
from ..config import AdapterConfig, check_int, check_neumann_terms, check_pattern, pattern_match
from ..errors import ConfigError
from ..orthogonal import orthogonal_from_packed, packed_size, split_rows, stacked
from ..registry import Method
from ..tracing import fx_tracing

SVD_MODES = ("full", "lowrank")


@dataclass(kw_only=True)
class PSOFTConfig(AdapterConfig):
    """PSOFT settings.

    ``rank`` is r, the dimension of each layer's principal subspace (clamped, with a warning, where a layer allows
    less); ``rank_pattern`` maps module names (exact or a dotted suffix, the longest match wins) to their own rank.
    ``train_alpha`` / ``train_beta`` train the input-side / output-side scaling vectors (off: kept at 1, and the
    transform stays exactly orthogonal). ``neumann_terms=None`` is the exact Cayley transform. ``svd`` is "full"
    (exact) or "lowrank" (randomised). ``split_qkv=True`` gives q, k and v of a fused ``qkv`` Linear (timm) their
    own r-dimensional subspaces, as the paper adapted separate projections; it triples that layer's parameters.
    """

    rank: int = 46
    rank_pattern: dict[str, int] = field(default_factory=dict)
    train_alpha: bool = True
    train_beta: bool = True
    neumann_terms: int | None = None
    svd: str = "full"
    split_qkv: bool = False

    method = "psoft"

    def __post_init__(self):
        super().__post_init__()
        check_int(self.rank, "rank", 1, " (the paper uses 46 on ViT-B/16)")
        self.rank_pattern = check_pattern(self.rank_pattern, "rank_pattern", 1)
        if self.svd not in SVD_MODES:
            raise ConfigError(f"svd={self.svd!r} is not one of {SVD_MODES}.")
        check_neumann_terms(self.neumann_terms)


def principal_subspace(weight: torch.Tensor, rank: int, svd: str = "full") -> tuple[torch.Tensor, torch.Tensor]:
    """``A = V_r^T`` (rank, in) and ``B = U_r S_r`` (out, rank) of a 2-D weight, in fp32, with canonical signs.

    ``svd="full"`` is exact: an fp64 eigendecomposition of the smaller Gram matrix, which on ViT-B/16 agrees with
    an fp64 SVD to 1e-13 and runs twice as fast as an fp32 LAPACK SVD (that one is only good to ~4e-5).
    ``"lowrank"`` is torch's randomised SVD, seeded. Each singular pair is flipped so that the largest-magnitude
    entry of its column of U is positive: the same weight then gives the same A and B on any machine (barring
    equal singular values).
    """
    if svd == "full":
        a, b = _top_singular(weight.detach(), rank)
    else:
        with torch.random.fork_rng(devices=[weight.device] if weight.is_cuda else []):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(weight.detach().float(), q=min(rank + 8, *weight.shape), niter=4)
        a, b = v[:, :rank].T, u[:, :rank] * s[:rank]
    pivot = b.abs().argmax(dim=0)
    signs = torch.sign(b[pivot, torch.arange(b.shape[1], device=b.device)])
    signs[signs == 0] = 1
    return (signs[:, None] * a).float(), (b * signs).float()


_SLICES = 8  # the weight is read in eighths: an fp64 slice is a quarter of the fp32 weight


def _slices(length: int) -> list[slice]:
    step = max(1, -(-length // _SLICES))
    return [slice(start, start + step) for start in range(0, length, step)]


def _gram(parts) -> torch.Tensor:
    """``sum p^T p`` over the fp32 slices ``parts``, accumulated in place in fp64 (one fp64 slice at a time)."""
    gram = None
    for part in parts:
        part = part.double()
        gram = part.T @ part if gram is None else gram.addmm_(part.T, part)
    return gram


def _top_singular(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V_r^T, U_r S_r)`` of ``w`` in fp64 from the eigenvectors of its smaller Gram matrix (eigh sorts
    ascending). ``w`` is read in fp64 slices, never copied whole: besides the weight itself, the peak is the fp64
    Gram matrix of the smaller side with eigh's eigenvectors and workspace, and one slice (tests/test_quantized.py
    measures it for a dequantized layer)."""
    rows, columns = _slices(w.shape[0]), _slices(w.shape[1])
    if w.shape[0] >= w.shape[1]:
        v = torch.linalg.eigh(_gram(w[s] for s in rows)).eigenvectors[:, -rank:].flip(-1)
        return v.T, torch.cat([w[s].double() @ v for s in rows])
    values, u = torch.linalg.eigh(_gram(w[:, s].T for s in columns))
    u, s = u[:, -rank:].flip(-1), values[-rank:].flip(-1).clamp_min(0).sqrt()
    if s[-1] <= 1e-6 * s[0]:  # V = W^T U / S breaks down on (numerically) zero singular values
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        return vh[:rank], u[:, :rank] * s[:rank]
    return torch.cat([u.T @ w[:, c].double() for c in columns], dim=1) / s[:, None], u * s


def _fusable(inner: Inner, conv: dict | None) -> bool:
    """Whether ``inner`` is a plain frozen Linear (Conv2d) without hooks, with which the adapter can run in one
    autograd node (not under torch.export or torch.fx, which cannot trace the node's ``out=`` ops). A forward replaced
    on the instance, as accelerate's offloading hooks do to load the weight, must run."""
    base = inner.module
    return (
        base is not None
        and not (torch.compiler.is_exporting() or fx_tracing())
        and type(base) is (nn.Linear if conv is None else nn.Conv2d)
        and not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)
        and not (base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__)
        and (conv is None or not isinstance(conv["padding"], str))
    )


class _PrincipalLinear(torch.autograd.Function):
    """``y = x W^T + b + (x A^T) U^T`` for a frozen W, b, A and a trainable ``U = B (C - I)``, as one node.

    Only ``z = x A^T`` (r wide) is kept for backward. When a layer's weight is smaller than its activations
    (``out * in < tokens * (in + out)``), the adapted weight ``W + U A`` is formed for the
    forward and again in the backward (``out * r * in`` each) instead of running the r-wide path per token
    (``tokens * r * (in + out)`` each way): the per-token cost over the frozen layer is then ``z`` and ``g^T z``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, up):
        x2 = x.reshape(-1, x.shape[-1])
        out_features, in_features = weight.shape
        form = out_features * in_features < x2.shape[0] * (in_features + out_features)
        z = x2 @ a.T
        # The output is allocated in its final shape and filled through a 2-D view: returning a view made inside
        # the Function would forbid the in-place updates that some parents apply to a layer's output.
        y = x2.new_empty(*x.shape[:-1], out_features)
        y2 = y.view(-1, out_features)
        matrix = torch.addmm(weight, up, a) if form else weight
        if bias is None:
            torch.mm(x2, matrix.T, out=y2)
        else:
            torch.addmm(bias, x2, matrix.T, out=y2)
        if not form:
            y2.addmm_(z, up.T)
        ctx.save_for_backward(z, weight, a, up)
        ctx.input_shape, ctx.form = x.shape, form
        return y

    @staticmethod
    def backward(ctx, grad):
        z, weight, a, up = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ torch.addmm(weight, up, a) if ctx.form else (g @ weight).addmm_(g @ up, a)
            grad_x = grad_x.reshape(ctx.input_shape)
        if ctx.needs_input_grad[4]:
            grad_up = g.T @ z
        return grad_x, None, None, None, grad_up


class _PrincipalConv2d(torch.autograd.Function):
    """The Conv2d twin of :class:`_PrincipalLinear`: ``conv(x, W) + conv1x1(conv(x, A), U)`` as one node, with
    ``W + U A`` formed per step when the kernel is smaller than the activations, and only ``z = conv(x, A)`` kept."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernel, up, conv):
        z = F.conv2d(x, kernel, None, **conv)
        tokens, fan_in = z.shape[0] * z.shape[2] * z.shape[3], kernel[0].numel()
        form = weight.shape[0] * fan_in < tokens * (fan_in + weight.shape[0])
        if form:
            y = F.conv2d(x, _adapted_kernel(weight, up, kernel), bias, **conv)
        else:
            y = F.conv2d(x, weight, bias, **conv)
            y += F.conv2d(z, up[..., None, None])
        ctx.save_for_backward(z, weight, kernel, up)
        ctx.input_shape, ctx.conv, ctx.form = x.shape, conv, form
        return y

    @staticmethod
    def backward(ctx, grad):
        z, weight, kernel, up = ctx.saved_tensors
        grad_x = grad_up = None
        if ctx.needs_input_grad[0]:
            if ctx.form:
                grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, _adapted_kernel(weight, up, kernel), grad,
                                                    **ctx.conv)
            else:
                grad_z = torch.einsum("nohw,or->nrhw", grad, up)
                grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad, **ctx.conv)
                grad_x += torch.nn.grad.conv2d_input(ctx.input_shape, kernel, grad_z, **ctx.conv)
        if ctx.needs_input_grad[4]:
            grad_up = torch.einsum("nohw,nrhw->or", grad, z)
        return grad_x, None, None, None, grad_up, None


def _adapted_kernel(weight, up, kernel):
    return torch.addmm(weight.flatten(1), up, kernel.flatten(1)).view_as(weight)


def _transforms(adapters: list["PSOFTAdapter"]) -> torch.Tensor:
    """``C = diag(beta) R diag(alpha)`` of every chunk of ``adapters`` (equal batch keys), stacked in order, fp32,
    shape (chunks, rank, rank)."""
    first = adapters[0]
    q = stacked([a.at_strength(a.q, 0.0) for a in adapters])
    segments = tuple(a.chunks for a in adapters) if len(adapters) > 1 else None
    c = orthogonal_from_packed(q, first.rank, first.neumann_terms, segments)
    if first.beta is not None:
        c = stacked([a.at_strength(a.beta, 1.0) for a in adapters]).float()[..., :, None] * c
    if first.alpha is not None:
        c = c * stacked([a.at_strength(a.alpha, 1.0) for a in adapters]).float()[..., None, :]
    return c


class PSOFTAdapter(Adapter):
    """PSOFT on one Linear or Conv2d; with ``split_qkv`` on a fused qkv the output rows split into three
    independent subspaces (``chunks``)."""

    method = "psoft"

    def __init__(self, base: Base, config: PSOFTConfig):
        super().__init__(config)
        self.conv = base.conv
        weight = base.pretrained_weight()
        # Independent subspaces over blocks of output rows: q, k and v of a fused qkv, or the groups of a grouped
        # convolution (whose weight already holds each group's own input channels).
        chunks = base.kind.groups
        if config.split_qkv and base.name.split(".")[-1] == "qkv":
            chunks = 3
        out_features = weight.shape[0]
        if out_features % chunks:
            raise ConfigError(f"{base.name!r}: {out_features} output rows cannot be split into {chunks} chunks.")
        rank = pattern_match(config.rank_pattern, base.name) or config.rank
        max_rank = min(out_features // chunks, math.prod(weight.shape[1:]))
        if rank > max_rank:
            self.adjusted = {"rank": (rank, max_rank, "exceeds the largest rank of")}
            rank = max_rank
        self.rank, self.chunks, self.neumann_terms, self.svd = rank, chunks, config.neumann_terms, config.svd
        self.grouped = base.kind.groups > 1
        self.quantization = base.kind.quantized  # the base runs as it is; the r-wide path is added to its output
        self.weight_shape = tuple(weight.shape)

        factors = [principal_subspace(w, rank, config.svd) for w in weight.flatten(1).chunk(chunks)]
        a = torch.cat([a for a, _ in factors]).to(weight.dtype)  # (chunks * rank, in * kh * kw)
        b = torch.stack([b for _, b in factors]).to(weight.dtype)  # (chunks, out / chunks, rank)
        # In the state dict: a freshly built model's own SVD would be of other weights until they are loaded.
        self.register_buffer("A", a)
        self.register_buffer("B", b)

        self.q = nn.Parameter(torch.zeros(chunks, packed_size(rank), device=weight.device))
        ones = torch.ones(chunks, rank, device=weight.device)
        self.alpha = nn.Parameter(ones.clone()) if config.train_alpha else None
        self.beta = nn.Parameter(ones.clone()) if config.train_beta else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def transform(self) -> torch.Tensor:
        """``C = diag(beta) R diag(alpha)`` per chunk, fp32, shape (chunks, rank, rank)."""
        return _transforms([self])

    def up_weight(self) -> torch.Tensor:
        """``B (C - I)`` as one (out, chunks * rank) matrix in fp32, block-diagonal over chunks."""
        return self.built(lambda: self.build_batch([self])[0])

    def batch_key(self):
        return (PSOFTAdapter, self.rank, self.neumann_terms, self.alpha is None, self.beta is None, self.q.device,
                self.q.dtype)

    @classmethod
    def build_batch(cls, adapters: list["PSOFTAdapter"]) -> list[torch.Tensor]:
        """``B (C - I)`` of each adapter, every C from one batched Cayley transform. The products with B stay one per
        layer: batched, they would need a copy of every B and hold every layer's gradient of ``up`` to the end of
        the backward (+30-45 MB on ViT-B/16) to save two ops per layer."""
        shifted = _transforms(adapters) - torch.eye(adapters[0].rank, device=adapters[0].q.device)
        return [a._up(rows) for a, rows in zip(adapters, split_rows(shifted, [a.chunks for a in adapters]),
                                                 strict=True)]

    def _up(self, shifted: torch.Tensor) -> torch.Tensor:
        """``B (C - I)`` from this adapter's ``C - I`` (chunks, r, r): (out, chunks * r), block-diagonal over chunks."""
        up = self.B.float() @ shifted
        return up.flatten(0, 1) if self.chunks == 1 else torch.block_diag(*(up[i] for i in range(self.chunks)))

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The update as an exact LoRA ``up @ down``: up ``B (C - I)`` (out, k) and down ``A`` in the layer's
        weight layout, (k, in) or (k, in, kh, kw), with ``k = chunks * rank``; fp32. None on a grouped
        convolution, whose update no LoRA layout holds (each group's down reads only its own channels)."""
        if self.grouped:
            return None
        return self.up_weight(), self.A.float().reshape(-1, *self.weight_shape[1:])

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``B (C - I) A`` in the layer's weight shape, in ``dtype`` (fp32 unless a merge into fp64 asks)."""
        return (self.up_weight().to(dtype) @ self.A.to(dtype)).reshape(self.weight_shape)

    def forward(self, x: torch.Tensor, inner: Inner) -> torch.Tensor:
        dtype = compute_dtype(x)
        up = self.up_weight().to(dtype)
        a = self.A.to(dtype)
        if self.quantization is None and _fusable(inner, self.conv) and not (
                self.training and isinstance(self.dropout, nn.Dropout)):
            base = inner.module
            with fp32(x.device):  # the node computes in ``dtype`` itself
                x, weight = x.to(dtype), base.weight.to(dtype)
                bias = None if base.bias is None else base.bias.to(dtype)
                if self.conv is None:
                    return _PrincipalLinear.apply(x, weight, bias, a, up)
                return _PrincipalConv2d.apply(x, weight, bias, a.reshape(-1, *self.weight_shape[1:]), up, self.conv)
        h = self.dropout(x)
        if self.conv is None:
            return inner(x) + F.linear(F.linear(h, a), up)
        h = F.conv2d(h, a.reshape(-1, *self.weight_shape[1:]), **self.conv)
        return inner(x) + F.conv2d(h, up[..., None, None])

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        wide = merge_precision(weight)
        return (wide + self.delta_weight(wide.dtype)).to(weight.dtype)

    def describe(self) -> dict:
        return {"rank": self.rank, "chunks": self.chunks, "svd": self.svd, "weight_shape": list(self.weight_shape),
                "weight_dtype": str(self.A.dtype).removeprefix("torch."), "quantization": self.quantization}

    def _probe(self) -> torch.Tensor:
        """The seeded Gaussian (in * kh * kw, k) that sketches the subspace: ``k = min(4 r, in * kh * kw)``
        columns, enough oversampling that the sketch pins the basis without amplifying rounding noise."""
        width = self.A.shape[1]
        gen = torch.Generator().manual_seed(0)
        return torch.randn(width, min(4 * self.rank, width), generator=gen).to(self.A.device)

    def anchors(self) -> dict[str, torch.Tensor]:
        """``A @ probe`` in fp16 (``8 r^2`` bytes per layer): the basis of the subspace the adapter trains in."""
        return {"subspace_sketch": (self.A.float() @ self._probe()).half()}

    def realign(self, anchors: dict[str, torch.Tensor], saved: dict, weight: torch.Tensor) -> None:
        """On a base of another precision than the one saved, turn the subspace recomputed from the rounded weight
        into the basis the adapter was trained in.

        The top-r subspace of a rounded weight is close to the original one, but its singular vectors can rotate
        freely within clusters of nearly equal singular values, and the trained ``C`` acts on them one by one. Per
        chunk, the r x r map ``M`` with ``M A_new probe = sketch`` (least squares), made orthogonal (its polar
        factor), gives ``A = M A_new`` and ``B = W A^T``, in fp32 from the weight before either is rounded.
        """
        if saved.get("weight_dtype") in (None, str(self.A.dtype).removeprefix("torch.")):
            return  # the same weights in the same dtype give the same subspace: nothing to correct
        probe, r = self._probe(), self.rank
        a_new = self.A.float().unflatten(0, (self.chunks, r))
        sketch = anchors["subspace_sketch"].float().to(a_new.device).unflatten(0, (self.chunks, r))
        u, _, vh = torch.linalg.svd(sketch @ torch.linalg.pinv(a_new @ probe))  # (chunks, r, r)
        a = (u @ vh) @ a_new
        rows = weight.detach().float().flatten(1).unflatten(0, (self.chunks, -1))  # (chunks, out / chunks, in)
        self.A.copy_(a.flatten(0, 1).to(self.A.dtype))
        self.B.copy_((rows @ a.mT).to(self.B.dtype))
        self._cache = None

    def extra_repr(self) -> str:
        return f"rank={self.rank}, chunks={self.chunks}, neumann_terms={self.neumann_terms}"


# "dreambooth": searched on the offline pipeline (train/dreambooth/search.py, docs/dreambooth_search.md).
METHOD = Method("psoft", PSOFTConfig, PSOFTAdapter, low_rank=True, size_field="rank", size_pattern_field="rank_pattern",
                identity={"q": 0.0, "alpha": 1.0, "beta": 1.0}, learning_rates={"vtab": 2e-2, "dreambooth": 1e-2},
                display_name="PSOFT",
                summary="orthogonal fine-tuning in each weight's top-r principal subspace, plus two scaling vectors")
