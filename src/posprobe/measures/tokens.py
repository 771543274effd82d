"""Where a vision transformer keeps each patch token's position: a position probe per block, the learned
position embedding's similarity map, and the token-norm maps.

**Rows.** ``embed`` is what ``blocks[0]`` receives (patch embedding + position embedding + any pre-norm: the
position signal before attention mixes anything), then the output of every block. Class and register (prefix)
tokens never enter the probe (they have no grid location) but their norms are reported beside the patch tokens',
so a high-norm artefact token can be told from a register.

**Probe.** Every patch token of an image is one sample labelled with its patch index k = row * w + col (P = h * w
classes). The probe is linear discriminant analysis with shrinkage: standardised features, class means mu_k, the
pooled within-class covariance S shrunk towards the identity, Sigma = (1 - lam) S + lam I, and the linear scores
x^T Sigma^-1 mu_k - mu_k^T Sigma^-1 mu_k / 2. Why this probe:

- it is exact and closed form: one D x D eigendecomposition gives the fit for every ``lam``, and ``lam`` is chosen
  on a held-out validation split of the training images (then refitted on all of them); 50 ms per block for
  vit_tiny on 2 CPU cores, so every block, mode and image set is probed in seconds;
- it separates any set of distinct position vectors, however many classes per dimension (196 patches in 192
  dims for vit_tiny; test: 196 classes in 16 dims): its rule is the nearest class mean in a Mahalanobis metric.
  Least squares on one-hot targets has only D + 1 outputs' worth of rank to give P classes and masks classes
  (Hastie et al., ESL 4.2) once P approaches D; multinomial logistic regression (scikit-learn, lbfgs) needed
  10-30 s per fit here and scored lower on held-out photos (0.95-0.97 against 1.00 at vit_tiny's embed row);
- at the ``embed`` row a token is (content of its patch) + (position vector), and for inputs whose content is
  the same in distribution at every location the content part has the same covariance at every position: the
  model LDA assumes, and the one under which it is Bayes-optimal.

The row and column are decoded from the same fit, as the most probable row (column) under the class posteriors
softmax(scores) summed over the other axis: a separate linear row probe would have to separate unions of w
unrelated clusters, and fails where every patch is decodable (a random-weight vit_tiny on black: 65% rows
against 100% patches), measuring how linear the layout is rather than whether it is known. The distance error is
the Euclidean distance in patches between the true (row, col) and that of the predicted index. Ties (identical
tokens, e.g. a black image without position embedding, where every score is equal) are scored in expectation
over a uniform tie-break, so a probe that knows nothing scores exactly chance, not whatever class ``argmax``
happens to return first.

**Extraction and the feature cache.** The patch-token grids of every block are what the feature cache holds for a
timm ViT built with ``layers=("all",)`` ((N, D, h, w) per block, prefix tokens dropped): with a cache they come
from it (float16 on disk, memory-mapped, read one block at a time, shared with ``measure`` / ``probe`` runs of the
same backbone and images). The cache cannot hold the ``embed`` input nor any prefix token, and prefix-token norms
need every block, so one hook pass (a forward pre-hook on ``blocks[0]``, a forward hook on every block) runs
anyway: it keeps the ``embed`` tokens and every token's norm (float32, exact), and without a cache also every
block's patch tokens, so that ``--no-cache`` costs one forward pass and not two.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PosprobeError
from ..intervals import Interval, bootstrap

EMBED = "embed"
SHRINKAGES = (1e-4, 1e-3, 1e-2, 0.1, 0.3, 0.6, 0.9)  # lam candidates, chosen on the validation images
DEAD = 1e-5  # a feature whose std is below this x the row's RMS value is constant (rounding noise): dropped
TIE = 1e-9  # scores within this x (1 + |max|) of the best are tied
VIT_EXAMPLES = "timm:vit_tiny_patch16_224, timm:deit_small_patch16_224, timm:vit_small_patch16_224.augreg_in21k"


# ---- the model's layout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLayout:
    """What a ViT's token sequence is: ``prefix`` class / register tokens first, then the h x w patch grid."""

    model: nn.Module
    blocks: Sequence[nn.Module]
    prefix: int
    grid: tuple[int, int]
    dim: int
    prefix_names: tuple[str, ...]

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def rows(self) -> list[str]:
        """``embed``, then ``blocks.0`` ... ``blocks.{L-1}``: the rows of every result."""
        return [EMBED] + [f"blocks.{i}" for i in range(len(self.blocks))]


def _not_a_vit(name: str, why: str) -> PosprobeError:
    return PosprobeError(
        f"tokens need a vision transformer with patch tokens (a timm ViT: {VIT_EXAMPLES}); {name} {why} "
        "('posprobe backbones' lists backbones; timm.list_models('vit_*') lists timm's ViTs)"
    )


def check_token_backbone_name(name: str) -> None:
    """Refuse a backbone that cannot be a timm ViT before anything is built (resnet18, vgg16, tv:...)."""
    if not name.startswith("timm:"):
        raise _not_a_vit(name, "is not one (only timm: transformers expose their token sequence)")


def token_layout(backbone, image_size: int) -> TokenLayout:
    """The token layout of a timm ViT backbone built for ``image_size`` inputs; a PosprobeError for anything else
    (a CNN, a hierarchical transformer such as Swin, a model whose blocks change the token count)."""
    model = getattr(backbone.extractor, "model", None)
    name = backbone.name
    blocks = getattr(model, "blocks", None)
    patch_embed = getattr(model, "patch_embed", None)
    if model is None or not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or patch_embed is None:
        raise _not_a_vit(name, "has no patch embedding followed by one flat sequence of blocks")
    if len(backbone.levels) != len(blocks) or len({lv.stride for lv in backbone.levels}) != 1:
        raise _not_a_vit(name, "is hierarchical: its blocks are not all at one token grid")
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    _, h, w = backbone.level_shapes(image_size)[0]  # (D, h, w): the patch grid at this input size
    dim = int(backbone.levels[0].channels)
    names: list[str] = []
    if getattr(model, "cls_token", None) is not None:
        names.append("cls")
    if getattr(model, "dist_token", None) is not None:
        names.append("dist")
    names += [f"reg{i}" for i in range(int(getattr(model, "num_reg_tokens", 0) or 0))]
    if len(names) != prefix:
        names = [f"prefix{i}" for i in range(prefix)]
    return TokenLayout(model, blocks, prefix, (int(h), int(w)), dim, tuple(names))


# ---- extraction -----------------------------------------------------------------------------------------


@dataclass
class TokenSet:
    """One image set's tokens: the ``embed`` patch tokens (N, P, D), every block's patch tokens when kept
    ((N, P, D) each; else ``block_tokens`` reads them, e.g. from the feature cache), and the L2 norm of every token
    of every row, prefix tokens first (N, R, prefix + P), R = 1 + blocks."""

    layout: TokenLayout
    embed: torch.Tensor
    norms: torch.Tensor
    blocks: list[torch.Tensor] | None = None
    block_tokens: Callable[[int], torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.embed.shape[0])

    def tokens(self, row: int) -> torch.Tensor:
        """(N, P, D) float32 patch tokens of row ``row`` (0: embed, i + 1: block i), in row-major patch order."""
        if row == 0:
            return self.embed
        if self.blocks is not None:
            return self.blocks[row - 1]
        if self.block_tokens is None:
            raise ValueError("this TokenSet holds no block tokens")
        return self.block_tokens(row - 1)


@torch.inference_mode()
def extract_tokens(
    backbone,
    images: torch.Tensor,
    image_size: int,
    keep_blocks: bool = True,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> TokenSet:
    """One forward pass of ``images`` (N, 3, S, S) in [0, 1] through ``backbone`` (its own preprocessing), hooked:
    the ``embed`` tokens, every token's norm per row, and (``keep_blocks``) every block's patch tokens."""
    layout = token_layout(backbone, image_size)
    n, p, t = images.shape[0], layout.patches, layout.prefix + layout.patches
    rows = len(layout.blocks) + 1
    embed = torch.empty(n, p, layout.dim)
    norms = torch.empty(n, rows, t)
    kept = [torch.empty(n, p, layout.dim) for _ in layout.blocks] if keep_blocks else None
    at = {"lo": 0, "hi": 0}

    def record(row: int, x: torch.Tensor) -> None:
        x = x[0] if isinstance(x, (tuple, list)) else x
        if x.dim() != 3 or x.shape[1] != t:
            raise _not_a_vit(
                backbone.name,
                f"gives {tuple(x.shape)} tokens at row {layout.rows[row]}, not (B, {t}, D) "
                f"({layout.prefix} prefix + {layout.grid[0]}x{layout.grid[1]} patches)",
            )
        lo, hi = at["lo"], at["hi"]
        x = x.float().cpu()
        norms[lo:hi, row] = x.norm(dim=-1)  # (B, T)
        if row == 0:
            embed[lo:hi] = x[:, layout.prefix :]  # (B, T, D) -> (B, P, D): prefix tokens dropped
        elif kept is not None:
            kept[row - 1][lo:hi] = x[:, layout.prefix :]

    hooks = [layout.blocks[0].register_forward_pre_hook(lambda m, args: record(0, args[0]))]
    hooks += [b.register_forward_hook(lambda m, a, out, i=i: record(i + 1, out)) for i, b in enumerate(layout.blocks)]
    backbone = backbone.to(device)
    try:
        for lo in range(0, n, batch_size):
            at["lo"], at["hi"] = lo, min(n, lo + batch_size)
            backbone(images[lo : at["hi"]].to(device))
            if progress is not None:
                progress(at["hi"], n)
    finally:
        for h in hooks:
            h.remove()
    return TokenSet(layout, embed, norms, kept)


# ---- the probe ------------------------------------------------------------------------------------------


def _grid_coords(grid: tuple[int, int]) -> torch.Tensor:
    """(P, 2) float64 (row, col) of every patch index, row-major."""
    h, w = grid
    k = torch.arange(h * w)
    return torch.stack([k // w, k % w], dim=1).double()


def position_chance(grid: tuple[int, int]) -> dict[str, float]:
    """What a probe that knows nothing scores: 1/h rows, 1/w columns, 1/P patches, and the mean distance in patches
    between a uniformly drawn true patch and an independent uniform guess."""
    h, w = grid
    c = _grid_coords(grid)
    distance = float(torch.cdist(c, c).mean())  # (P, P) every pair, the diagonal included
    return {"row_top1": 1 / h, "col_top1": 1 / w, "index_top1": 1 / (h * w), "distance": distance}


def _tied_hits(scores: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hit, tied): per sample, the expected top-1 under a uniform tie-break of the best-scoring classes, and the
    (n, K) bool mask of those classes."""
    best = scores.max(dim=1, keepdim=True).values
    tied = scores >= best - TIE * (1 + best.abs())  # (n, K)
    hit = tied.gather(1, truth[:, None]).squeeze(1).double() / tied.sum(1).double()
    return hit, tied


class TokenPositionProbe:
    """Shrinkage LDA from a token to its patch index (module doc), scikit-learn shaped: settings in ``__init__``,
    ``fit`` returns self, learned state ends in ``_``.

    ``shrinkage``: a fixed lam in (0, 1], or None to choose it from ``shrinkages`` on ``fit``'s validation set.
    """

    def __init__(self, grid: tuple[int, int], shrinkage: float | None = None, shrinkages: Sequence[float] = SHRINKAGES):
        self.grid = (int(grid[0]), int(grid[1]))
        self.shrinkage = shrinkage
        self.shrinkages = tuple(shrinkages)

    @property
    def classes(self) -> int:
        return self.grid[0] * self.grid[1]

    def _moments(self, x: torch.Tensor, y: torch.Tensor):
        """Standardisation, class means and the eigendecomposition of the pooled within-class covariance."""
        x = x.double()
        mean = x.mean(0)
        std = x.std(0, correction=0)
        rms = x.pow(2).mean().sqrt()
        live = std > DEAD * max(float(rms), 1e-30)  # constant features (and rounding noise on them) dropped
        scale = torch.where(live, std, torch.ones_like(std))
        z = (x - mean) / scale * live  # (n, D) standardised, dead features 0
        counts = torch.bincount(y, minlength=self.classes).double()
        mu = torch.zeros(self.classes, z.shape[1], dtype=z.dtype).index_add_(0, y, z) / counts.clamp(min=1)[:, None]
        resid = z - mu[y]  # (n, D) within-class deviations
        within = resid.T @ resid / max(z.shape[0] - int((counts > 0).sum()), 1)
        evals, evecs = torch.linalg.eigh(within)
        return mean, scale, live, mu, counts > 0, evals.clamp(min=0), evecs

    @staticmethod
    def _weights(mu: torch.Tensor, present: torch.Tensor, evals, evecs, lam: float):
        """(D, K) weights and (K,) biases of the linear scores for shrinkage ``lam``."""
        inv = 1.0 / ((1 - lam) * evals + lam)  # Sigma = (1 - lam) S + lam I in the eigenbasis
        w = evecs @ (inv[:, None] * (evecs.T @ mu.T))  # (D, K) = Sigma^-1 mu^T
        b = -0.5 * (mu.T * w).sum(0)
        b = torch.where(present, b, torch.full_like(b, -math.inf))  # a class never seen is never predicted
        return w, b

    def _set(self, x: torch.Tensor, y: torch.Tensor, lam: float) -> None:
        mean, scale, live, mu, present, evals, evecs = self._moments(x, y)
        self.mean_, self.scale_, self.live_ = mean, scale, live
        self.coef_, self.intercept_ = self._weights(mu, present, evals, evecs, lam)
        self.shrinkage_ = lam

    def fit(
        self, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None
    ) -> TokenPositionProbe:
        """Fit on tokens ``x`` (n, D) with patch indices ``y`` (n,); with ``shrinkage`` None, lam is the candidate
        with the best validation top-1 on (``x_val``, ``y_val``) (ties: the larger lam), then the probe is refitted
        on both sets. Without validation data the smallest candidate is used."""
        y = y.long()
        if self.shrinkage is not None:
            self._set(x, y, float(self.shrinkage))
            self.validation_ = {}
            return self
        if x_val is None or y_val is None or len(x_val) == 0:
            self._set(x, y, min(self.shrinkages))
            self.validation_ = {}
            return self
        mean, scale, live, mu, present, evals, evecs = self._moments(x, y)
        z_val = self._standardise(x_val, mean, scale, live)
        self.validation_ = {}
        for lam in self.shrinkages:
            w, b = self._weights(mu, present, evals, evecs, lam)
            hit, _ = _tied_hits(z_val @ w + b, y_val.long())
            self.validation_[lam] = float(hit.mean())
        best = max(self.validation_.values())
        lam = max(k for k, v in self.validation_.items() if v >= best - 1e-12)
        self._set(torch.cat([x, x_val]), torch.cat([y, y_val.long()]), lam)
        return self

    @staticmethod
    def _standardise(x, mean, scale, live) -> torch.Tensor:
        return (x.double() - mean) / scale * live

    def decision_function(self, x: torch.Tensor) -> torch.Tensor:
        """(n, P) float64 linear scores."""
        return self._standardise(x, self.mean_, self.scale_, self.live_) @ self.coef_ + self.intercept_

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(n,) patch indices (ties: the lowest index)."""
        return self.decision_function(x).argmax(1)

    def score_samples(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per token (n,): expected top-1 of the index, the row and the column (uniform tie-break), and the
        expected distance in patches between the true and the predicted patch."""
        h, w = self.grid
        y = y.long()
        scores = self.decision_function(x)  # (n, P)
        index_hit, tied = _tied_hits(scores, y)
        coords = _grid_coords(self.grid)  # (P, 2)
        dist_to_truth = torch.cdist(coords[y], coords)  # (n, P)
        distance = (dist_to_truth * tied).sum(1) / tied.sum(1)
        post = torch.softmax(scores, dim=1).view(-1, h, w)  # (n, P) -> (n, h, w) posteriors
        row_hit, _ = _tied_hits(post.sum(2), torch.div(y, w, rounding_mode="floor"))
        col_hit, _ = _tied_hits(post.sum(1), y % w)
        return {"index_top1": index_hit, "row_top1": row_hit, "col_top1": col_hit, "distance": distance}


# ---- one row: split, fit, score --------------------------------------------------------------------------

METRICS = ("index_top1", "row_top1", "col_top1", "distance")


@dataclass(frozen=True)
class ImageSplit:
    """Indices of the images a probe is fitted on (train, validation for lam) and scored on (test);
    ``held_out`` False when a set has a single distinct image, scored on that image."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]
    held_out: bool = True

    def to_dict(self) -> dict:
        return {
            "train": len(self.train),
            "validation": len(self.val),
            "test": len(self.test),
            "held_out": self.held_out,
        }


def split_images(
    groups: Sequence[str], seed: int = 0, test_fraction: float = 0.25, val_fraction: float = 0.2, what: str = "images"
) -> ImageSplit:
    """A seeded split by image group (the crops of one photo stay together): ``test_fraction`` of the groups are
    held out, ``val_fraction`` of the rest choose the shrinkage. One distinct image: trained and scored on it."""
    names = list(dict.fromkeys(groups))
    if len(groups) == 1:
        return ImageSplit((0,), (), (0,), held_out=False)
    if len(names) < 3:
        raise PosprobeError(
            f"{what}: a held-out split needs images of at least 3 distinct photos (training, validation, test); "
            f"given {len(names)}; pass more images (--n-images, or a folder with more)"
        )
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = min(len(names) - 2, max(1, round(test_fraction * len(names))))
    n_val = min(len(names) - n_test - 1, max(1, round(val_fraction * (len(names) - n_test))))
    test_g = {names[i] for i in order[:n_test]}
    val_g = {names[i] for i in order[n_test : n_test + n_val]}
    pick = lambda chosen: tuple(i for i, g in enumerate(groups) if g in chosen)  # noqa: E731
    train_g = set(names) - test_g - val_g
    return ImageSplit(pick(train_g), pick(val_g), pick(test_g))


@dataclass
class PositionScores:
    """One row's probe: each metric's mean over the test images with its 95% bootstrap interval over test image
    groups, the shrinkage chosen, and the per-image values the intervals came from."""

    row: str
    index_top1: Interval
    row_top1: Interval
    col_top1: Interval
    distance: Interval
    shrinkage: float
    n_test_images: int
    per_image: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"row": self.row}
        for m in METRICS:
            iv = getattr(self, m)
            out[m] = {"mean": iv.mean, "lo": _finite(iv.lo), "hi": _finite(iv.hi)}
        out.update(shrinkage=self.shrinkage, n_test_images=self.n_test_images)
        return out


def _finite(v: float) -> float | None:
    return None if math.isnan(v) else v


def _labelled(tokens: torch.Tensor, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P, D) tokens of images ``idx`` -> (n * P, D) samples and (n * P,) patch indices."""
    sub = tokens[list(idx)]  # (n, P, D)
    n, p, d = sub.shape
    return sub.reshape(n * p, d), torch.arange(p).repeat(n)


def probe_position(
    tokens: torch.Tensor,
    grid: tuple[int, int],
    split: ImageSplit,
    groups: Sequence[str],
    row: str = "",
    seed: int = 0,
) -> PositionScores:
    """Fit a TokenPositionProbe on the split's training tokens of ``tokens`` (N, P, D) and score the test images; the
    intervals resample test image groups (the crops of one photo are one sample)."""
    if tokens.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"tokens (N, P, D) with P = {grid[0]}x{grid[1]}; got {tuple(tokens.shape)}")
    x, y = _labelled(tokens, split.train)
    xv, yv = _labelled(tokens, split.val) if split.val else (None, None)
    probe = TokenPositionProbe(grid).fit(x, y, xv, yv)
    xt, yt = _labelled(tokens, split.test)
    per_token = probe.score_samples(xt, yt)
    n_test, p = len(split.test), tokens.shape[1]
    test_groups = [groups[i] for i in split.test]
    names = list(dict.fromkeys(test_groups))
    member = torch.tensor([names.index(g) for g in test_groups])
    out, per_image = {}, {}
    for m in METRICS:
        img = per_token[m].view(n_test, p).mean(1)  # (n_test * P,) -> (n_test, P) -> per image
        per_image[m] = img.tolist()
        by_group = torch.zeros(len(names), dtype=torch.float64).index_add_(0, member, img)
        by_group /= torch.bincount(member, minlength=len(names)).double()
        out[m] = bootstrap(by_group, seed=seed)
    return PositionScores(row, shrinkage=probe.shrinkage_, n_test_images=n_test, per_image=per_image, **out)


# ---- position-embedding similarity and token norms -------------------------------------------------------


def patch_pos_embed(layout: TokenLayout) -> torch.Tensor | None:
    """(P, D) the learned position vectors added to the patch tokens (prefix positions dropped), or None when the
    model has no learned absolute embedding (rotary or relative position only)."""
    pe = getattr(layout.model, "pos_embed", None)
    if not isinstance(pe, nn.Parameter) or pe.dim() != 3:
        return None
    p = layout.patches
    if pe.shape[1] < p:
        return None
    return pe.detach()[0, pe.shape[1] - p :].float().cpu()  # (1, prefix + P, D) -> (P, D)


def cosine_similarity_map(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(h, w, h, w): entry [r, c] is the map of cosine similarities of patch (r, c)'s vector with every patch's.
    A zero vector (``--pos-embed zero``) has no direction: its rows and columns are NaN."""
    h, w = grid
    if pos.shape[0] != h * w:
        raise ValueError(f"expected {h * w} position vectors for a {h}x{w} grid; got {tuple(pos.shape)}")
    pos = pos.double()
    norm = pos.norm(dim=1)
    unit = pos / norm[:, None]  # NaN where the norm is 0
    sim = unit @ unit.T  # (P, P)
    return sim.view(h, w, h, w).float()


@dataclass
class TokenNorms:
    """Mean L2 norm of each token over the images, per row: ``patch`` (R, h, w) and ``prefix`` (R, prefix)."""

    rows: list[str]
    patch: torch.Tensor
    prefix: torch.Tensor
    prefix_names: tuple[str, ...]

    def peaks(self) -> list[dict]:
        """Per row: the mean and median patch norm, the highest-norm patch (row, col) and its ratio to the median,
        and each prefix token's norm: where a high-norm artefact token sits."""
        out = []
        h, w = self.patch.shape[1:]
        for i, name in enumerate(self.rows):
            m = self.patch[i].flatten()
            k = int(m.argmax())
            median = float(m.median())
            out.append(
                {
                    "row": name,
                    "patch_mean": float(m.mean()),
                    "patch_median": median,
                    "patch_max": float(m[k]),
                    "patch_max_at": [k // w, k % w],
                    "patch_max_over_median": float(m[k]) / median if median > 0 else math.nan,
                    "prefix": {n: float(v) for n, v in zip(self.prefix_names, self.prefix[i])},
                }
            )
        return out

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "prefix_names": list(self.prefix_names),
            "patch_norm_maps": self.patch.tolist(),
            "prefix_norms": self.prefix.tolist(),
            "peaks": self.peaks(),
        }


def token_norms(norms: torch.Tensor, layout: TokenLayout) -> TokenNorms:
    """The norm maps from a TokenSet's ``norms`` (N, R, prefix + P)."""
    mean = norms.double().mean(0)  # (R, T)
    patch = mean[:, layout.prefix :].reshape(-1, *layout.grid)  # (R, P) -> (R, h, w)
    return TokenNorms(layout.rows, patch.float(), mean[:, : layout.prefix].float(), layout.prefix_names)
