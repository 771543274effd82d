"""The exact linear probe: the best linear k x k readout of the frozen features, in closed form.

"How much position is linearly decodable?" has an exact answer with no training noise. The readout is one
k x k convolution C -> 1 with a bias (no BatchNorm, no Sigmoid) whose (s, s) map is upsampled bilinearly
to the target's size, as the PEM's is. Unfolding the features of image i into patches X_i (s^2, D),
D = C k^2 + 1 (the 1 is the bias), and writing U for the fixed upsampling (H W, s^2), the training MSE is

    sum_i |U X_i v - y|^2 = v^T A v - 2 v^T b + n |y|^2,   A = sum_i X_i^T M X_i,  b = (sum_i X_i)^T U^T y,

with M = U^T U. This is the objective an SGD-trained readout of the same form minimises, at full resolution:
no approximation by downsampling the target. A is shared by every pattern, only b differs, and both come
from one streaming pass. Ridge: inputs are standardised by their channel's root mean square over the
training images (the bias by 1), and ``alpha * n * tr(M) * |v_standardised|^2`` is added, so alpha is
relative to the data term; alpha is chosen per pattern on a held-out split of the training images, then the
probe is refitted on all of them.

Solvers: ``direct`` accumulates A (D x D, float64; the per-image products in float32 above 4096 inputs) and solves
by Cholesky for every alpha; ``cg`` never forms A: conjugate gradients whose products ``A v`` are one pass
over the features each (the fused convolution of ``joint``), every (alpha, pattern) system a column of the
same pass. ``auto`` takes direct whenever the three D x D float64 matrices it holds fit 40% of the available
memory (on a 24 GB machine up to D of about 18,000: VGG16 at k=3 has D = 13,249) and CG above (ResNet-152 at
k=3: D = 34,561, 29 GB). Accumulating A costs n s^2 D^2 multiply-adds, minutes for VGG16 at k=3.

CG is preconditioned because the standardisation is not enough: the spectrum of deep features decays like a
power law over many decades, not along the axes, so plain CG needs thousands of passes at small alpha, and
(block-)diagonal scaling does not help: Jacobi is no better than the standardisation, and block-Jacobi over
each channel's k x k taps is worse still on ResNet-152 (and, like any block Cholesky, must be refactored for
every alpha). A randomised Nystrom approximation A ~ U diag(lam) U^T of rank ``cg_rank`` (Frangella, Tropp and
Udell 2023) captures the top of the spectrum from A Omega, Omega a random orthonormal (D, rank): one pass of
rank columns per split, and D x rank float64 numbers (221 MB at D = 34,561 and rank 800). Its preconditioner
for any ridge shift is a closed form, so one sketch serves every alpha. It changes how fast CG converges,
never the system solved: ResNet-152 at k=3 took 6,981 passes without it and 228 with it (benchmarks/RESULTS.md);
``cg_rank=0`` turns it off; ``residual_`` reports how far CG got.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import PosprobeError, unknown_choice
from ..features.parts import FeatureBatch, align
from ..features.sources import as_source, memory_budget_bytes
from ..targets import PATTERNS
from .estimator import Estimator
from .joint import MapLoss, conv_parts
from .pem import UpsampledHead, check_readout_config, readout_map_size

# Relative ridge strengths tried on the held-out split. Below 1e-4 the held-out MSE of real features is flat
# to 3 digits while CG needs ~sqrt(1/alpha) iterations; pass smaller ones explicitly for the bare optimum.
DEFAULT_ALPHAS: tuple[float, ...] = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
SOLVERS = ("auto", "direct", "cg")


class LinearReadout(UpsampledHead):
    """One k x k convolution C -> 1 with bias, upsampled bilinearly (align_corners=False) to ``out_size``."""

    def __init__(
        self, in_channels: int, kernel_size: int = 3, padding: int = 0, feat_size: int = 28, out_size: int = 224
    ):
        super().__init__()
        check_readout_config(feat_size, kernel_size, 1, padding)
        self.in_channels, self.kernel_size, self.depth, self.padding = in_channels, kernel_size, 1, padding
        self.feat_size, self.out_size = feat_size, out_size
        self.head = nn.Sequential(nn.Conv2d(in_channels, 1, kernel_size, padding=padding))
        nn.init.xavier_uniform_(self.head[0].weight)
        nn.init.zeros_(self.head[0].bias)

    def forward_aligned(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, fs, fs) -> (B, 1, out_size, out_size)."""
        return F.interpolate(self.head(x), size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)

    def forward(self, levels) -> torch.Tensor:
        if isinstance(levels, torch.Tensor):
            levels = [levels]
        return self.forward_aligned(align(levels, self.feat_size))

    def set_vector(self, v: torch.Tensor) -> LinearReadout:
        """Load the solution vector (D,) = (weights in (c, dy, dx) order, bias)."""
        conv = self.head[0]
        with torch.no_grad():
            conv.weight.copy_(v[:-1].view_as(conv.weight).to(conv.weight.dtype))
            conv.bias.copy_(v[-1:].to(conv.bias.dtype))
        return self


def _vectors_to_conv(v: torch.Tensor, channels: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, Q) solution columns -> conv weight (Q, C, k, k) and bias (Q,), float32."""
    q = v.shape[1]
    return v[:-1].T.reshape(q, channels, k, k).float().contiguous(), v[-1].float().contiguous()


class _Problem:
    """The quadratic objective on a feature source, and the statistics of one streaming pass over it."""

    def __init__(
        self,
        source,
        channels: int,
        kernel_size: int,
        padding: int,
        targets: dict[str, torch.Tensor],
        batch_size: int,
        device: torch.device,
        progress: bool,
    ):
        self.source, self.c, self.k, self.p = source, channels, kernel_size, padding
        self.fs = source.feat_size
        self.s = readout_map_size(self.fs, kernel_size, 1, padding)
        self.dim = channels * kernel_size**2 + 1
        self.batch_size, self.device, self.progress = batch_size, device, progress
        self.names = list(targets)
        self.losses = [MapLoss(t.to(device), (self.s, self.s)) for t in targets.values()]
        self.bh, self.bw = self.losses[0].bh, self.losses[0].bw  # (s, s) each: M = B_h (x) B_w
        self.trace_m = float(torch.diagonal(self.bh).sum() * torch.diagonal(self.bw).sum())
        self.pixels = self.losses[0].pixels
        self.z = torch.stack([loss.z.flatten() for loss in self.losses], 1)  # (s^2, P): U^T y per pattern
        self.yy = torch.tensor([loss.yy for loss in self.losses], dtype=torch.float64, device=device)
        # products for the Gram: float64 while cheap; above 4096 inputs float32 (twice as fast, relative error
        # ~1e-6 per image), still accumulated over images in float64
        self.gram_dtype = torch.float64 if self.dim <= 4096 else torch.float32

    def batches(self, idx: torch.Tensor):
        return self.source.batches(idx, self.batch_size, self.device)

    # -- one pass: channel scales and b (and A for the direct solver) -----------------------------------
    def first_pass(self, splits: Sequence[torch.Tensor], gram: bool) -> list[dict]:
        """Per split: n, sum of squares per channel, b (D, P) and, with ``gram``, A (D, D) in float64."""
        out = []
        chunk = max(1, int((256 << 20) // (8 * self.dim * self.s * self.s * 2)))  # images per unfold (<= 256 MB)
        for idx in splits:
            st = {
                "n": len(idx),
                "sq": torch.zeros(self.c, dtype=torch.float64, device=self.device),
                "b": torch.zeros(self.dim, len(self.names), dtype=torch.float64, device=self.device),
            }
            if gram:
                st["A"] = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
            for _, batch in self.batches(idx):
                x = batch.aligned()  # (b, C, fs, fs)
                st["sq"] += x.double().square().sum((0, 2, 3))
                if gram:
                    for i in range(0, x.shape[0], chunk):
                        cols = self._unfold(x[i : i + chunk].to(self.gram_dtype))  # (b, D, s^2)
                        st["b"] += cols.sum(0).double() @ self.z
                        bh, bw = self.bh.to(cols.dtype), self.bw.to(cols.dtype)
                        mcols = (bh @ cols.view(-1, self.dim, self.s, self.s) @ bw).flatten(2)
                        st["A"] += torch.einsum("bdp,bep->de", cols, mcols).double()  # summed over images in float64
                else:
                    st["b"] += self._rhs(batch)
            if gram:
                st["A"] = (st["A"] + st["A"].T) / 2
            out.append(st)
        return out

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        """(b, C, fs, fs) -> patch columns (b, D, s^2), rows in (c, dy, dx) order, then the bias row of ones."""
        cols = F.unfold(F.pad(x, (self.p,) * 4) if self.p else x, self.k)  # (b, C k k, s^2)
        ones = torch.ones(cols.shape[0], 1, cols.shape[2], dtype=cols.dtype, device=cols.device)
        return torch.cat([cols, ones], 1)

    def _rhs(self, batch: FeatureBatch) -> torch.Tensor:
        """sum over the batch of X_i^T U^T y for every pattern: (D, P), by differentiating <conv(x), z>."""
        w = torch.zeros(len(self.names), self.c, self.k, self.k, device=self.device, requires_grad=True)
        bias = torch.zeros(len(self.names), device=self.device, requires_grad=True)
        with torch.enable_grad():
            y = conv_parts(batch, w, bias, self.p)  # (b, P, s, s)
            z = self.z.T.reshape(1, -1, self.s, self.s).float()
            (y * z).sum().backward()
        return torch.cat([w.grad.flatten(1).T, bias.grad[None]], 0).double()

    # -- matrix-free products ---------------------------------------------------------------------------
    def matvec(self, idx: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A v for columns v (D, Q), A over the images ``idx``: one pass, differentiating v^T A v / 2."""
        w0, b0 = _vectors_to_conv(v, self.c, self.k)
        out = torch.zeros_like(v)
        for _, batch in self.batches(idx):
            w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
            with torch.enable_grad():
                y = conv_parts(batch, w, b, self.p)  # (b, Q, s, s)
                (0.5 * (y * (self.bh.float() @ y @ self.bw.float())).sum()).backward()
            out += torch.cat([w.grad.flatten(1).T, b.grad[None]], 0).double()
        return out

    @torch.no_grad()
    def mse(self, idx: torch.Tensor, v: torch.Tensor, pattern_of_column: Sequence[int]) -> torch.Tensor:
        """Full-resolution training MSE of each column (Q,) on the images ``idx`` (one pass)."""
        w, b = _vectors_to_conv(v, self.c, self.k)
        total = torch.zeros(v.shape[1], dtype=torch.float64, device=self.device)
        for _, batch in self.batches(idx):
            y = conv_parts(batch, w, b, self.p)
            for q, p in enumerate(pattern_of_column):
                total[q] += self.losses[p].per_image(y[:, q]).sum()
        return total / len(idx)


def _scales(stats: list[dict], channels: int, k: int, fs: int) -> torch.Tensor:
    """Standardisation d (D,): each input's channel mean square over all training images; 1 for the bias."""
    sq = sum(st["sq"] for st in stats)
    n = sum(st["n"] for st in stats)
    ms = sq / (n * fs * fs)
    floor = 1e-12 * float(ms.mean()) if float(ms.mean()) > 0 else 1e-12
    ms = ms.clamp(min=floor)  # a dead channel gets a tiny scale: its weight is then penalised to 0
    return torch.cat([ms.repeat_interleave(k * k), ms.new_ones(1)])


def _solve_direct(
    a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, shifts: Sequence[float]
) -> list[torch.Tensor | None]:
    """v for (S A S + shift I) S^-1 v = S b with S = diag(d^-1/2), for every shift: (D, P) or None if singular."""
    s = d.rsqrt()
    a_hat = s[:, None] * a * s[None, :]
    b_hat = s[:, None] * b
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    out = []
    for shift in shifts:
        chol, info = torch.linalg.cholesky_ex(a_hat + shift * eye)
        out.append(None if int(info) else s[:, None] * torch.cholesky_solve(b_hat, chol))
    return out


class NystromPreconditioner:
    """Inverse of a Nystrom preconditioner for A + shift I, from a sketch A Omega; one sketch serves every shift.

    With A ~ U diag(lam) U^T (rank r, lam descending), the preconditioner is
    P = U diag(lam + shift) U^T / (lam_r + shift) + (I - U U^T): on the top of the spectrum it undoes A + shift,
    below it it leaves the rest (eigenvalues <= lam_r) alone, so the preconditioned system's condition number is
    about (lam_r + shift) / shift instead of (lam_1 + shift) / shift.
    """

    def __init__(self, omega: torch.Tensor, sketch: torch.Tensor):
        """``omega`` (D, r) with orthonormal columns, ``sketch`` = A omega (D, r), e.g. from float32 passes."""
        w = omega.T @ sketch
        theta, v = torch.linalg.eigh((w + w.T) / 2)  # the core omega^T A omega, symmetrised against rounding
        keep = theta > 1e-6 * float(theta.max().clamp(min=1e-300))  # below float32's reach: no information
        factor = sketch @ (v[:, keep] * theta[keep].rsqrt())  # A_nys = A omega (omega^T A omega)^+ omega^T A
        self.u, sigma, _ = torch.linalg.svd(factor, full_matrices=False)
        self.lam = sigma.square()  # A_nys = U diag(lam) U^T
        self.rank = len(self.lam)
        self.tiny = torch.finfo(self.lam.dtype).eps * float(self.lam[0]) if self.rank else 0.0

    def __call__(self, r: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """P^-1 r for columns r (D, Q), each with its own ridge shift (Q,)."""
        if not self.rank:
            return r
        ur = self.u.T @ r
        scale = (self.lam[-1] + shift).clamp(min=self.tiny)
        return r + self.u @ (ur * (scale / (self.lam[:, None] + shift).clamp(min=self.tiny) - 1))


def sketch_basis(dim: int, rank: int, seed: int = 0) -> torch.Tensor:
    """Random orthonormal columns (dim, rank) in float64, seeded on the CPU so every device draws the same."""
    gauss = torch.randn(dim, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.linalg.qr(gauss).Q


def conjugate_gradients(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    shifts: Sequence[float],
    precond: NystromPreconditioner | None = None,
    tol: float = 1e-6,
    max_iter: int = 1000,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Solve (A + shift I) x = b for every shift and every column of b (D, P) by (preconditioned) CG.

    A is symmetric positive semi-definite and given only through ``matvec`` ((D, Q) -> (D, Q)), which is the
    expensive part (a pass over the features): all L x P systems are columns of one product, and a column
    leaves the product once its relative residual |b - (A + shift) x| / |b| is at most ``tol``, so the number
    of products is that of the slowest system. Returns x (L, D, P), relative residuals (L, P), products.
    """
    n_shifts, (dim, cols) = len(shifts), b.shape
    shift = torch.tensor(list(shifts), dtype=b.dtype, device=b.device).repeat_interleave(cols)  # column l*P + p
    rhs = b.repeat(1, n_shifts)
    apply = precond if precond is not None else (lambda r, _: r)
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = apply(r, shift)
    p = z.clone()
    rz = (r * z).sum(0)
    bnorm = rhs.norm(dim=0).clamp(min=1e-300)
    residual = r.norm(dim=0) / bnorm
    active = residual > tol
    it = 0
    bar = tqdm(total=max_iter, desc="linear probe (CG)", unit="it", disable=None if progress else True, leave=False)
    while bool(active.any()) and it < max_iter:
        it += 1
        a = active.nonzero().squeeze(1)
        pa = p[:, a]
        ap = matvec(pa) + shift[a] * pa
        pap = (pa * ap).sum(0)
        step = torch.where(pap > 0, rz[a] / pap.clamp(min=1e-300), torch.zeros_like(pap))
        x[:, a] += step * pa
        ra = r[:, a] - step * ap
        r[:, a] = ra
        residual[a] = ra.norm(dim=0) / bnorm[a]
        za = apply(ra, shift[a])
        rz_new = (ra * za).sum(0)
        p[:, a] = za + rz_new / rz[a].clamp(min=1e-300) * pa
        rz[a] = rz_new
        active[a] = (residual[a] > tol) & (pap > 0)  # pap <= 0: breakdown on a singular system; stop that column
        bar.update(1)
    bar.close()
    return x.view(dim, n_shifts, cols).permute(1, 0, 2), residual.view(n_shifts, cols), it


class LinearProbe(Estimator):
    """The best linear k x k readout per target map, in closed form (ridge, alpha chosen on held-out images).

    The same shape as ``PositionProbe``: settings in ``__init__``, ``fit`` returns self, then ``predict``
    and ``score``; ``fit`` and ``score`` accept raw images, an ``EncodedSet`` or any feature source.
    Learned: ``readouts_`` (a ``LinearReadout`` per target), ``alpha_``, ``val_mse_`` ({target: {alpha:
    MSE}}), ``train_mse_``, ``solver_``, ``iterations_`` (passes), ``residual_`` and ``preconditioner_`` (CG),
    ``seconds_``.
    """

    fitted_name = "linear probe"

    def __init__(
        self,
        backbone=None,
        patterns: Sequence[str] = PATTERNS,
        kernel_size: int = 3,
        padding: int = 0,
        feat_size: int = 28,
        image_size: int = 224,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        holdout: float = 0.2,
        solver: str = "auto",
        max_direct_inputs: int | None = None,
        cg_tol: float = 1e-6,
        cg_max_iter: int = 1000,
        cg_rank: int = 800,
        batch_size: int = 32,
        seed: int = 0,
        device: str | torch.device = "cpu",
        extra_targets: Mapping[str, torch.Tensor] | None = None,
        encode_batch_size: int = 16,
        strict: bool = False,
        progress: bool = True,
        cache=None,
    ):
        super().__init__(
            backbone,
            patterns,
            kernel_size,
            1,
            padding,
            feat_size,
            image_size,
            seed,
            torch.device(device),
            extra_targets,
            encode_batch_size,
            strict,
            progress,
            cache,
        )
        if solver not in SOLVERS:
            raise unknown_choice("linear solver", solver, SOLVERS)
        alphas = sorted({float(a) for a in alphas}, reverse=True)
        if not alphas or any(a < 0 for a in alphas):
            raise PosprobeError(f"alphas must be non-negative and at least one; given {alphas}")
        if not 0 <= holdout < 1:
            raise PosprobeError(f"holdout must be in [0, 1); given {holdout}")
        self.alphas, self.holdout, self.solver = alphas, holdout, solver
        if cg_rank < 0:
            raise PosprobeError(f"cg_rank must be non-negative (0: no preconditioner); given {cg_rank}")
        self.max_direct_inputs, self.cg_tol, self.cg_max_iter = max_direct_inputs, cg_tol, cg_max_iter
        self.cg_rank = cg_rank
        self.batch_size = batch_size

    def _split(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if len(self.alphas) == 1 or self.holdout == 0 or n < 4:
            return torch.arange(n), None
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_val = max(1, round(self.holdout * n))
        return perm[n_val:].sort().values, perm[:n_val].sort().values

    def fit(self, images: Dataset) -> LinearProbe:
        started = time.perf_counter()
        source = as_source(self.encode(images))
        channels = source.channels
        self._check_channels(channels)
        prob = _Problem(
            source, channels, self.kernel_size, self.padding, self.targets, self.batch_size, self.device, self.progress
        )
        solver = self.solver
        if solver == "auto":
            limit = self.max_direct_inputs
            if limit is None:  # three D x D float64 matrices (A_fit, A_val, a factor) in 40% of free memory
                limit = int((memory_budget_bytes() / 24) ** 0.5)
            solver = "direct" if prob.dim <= limit else "cg"
        fit_idx, val_idx = self._split(len(source))
        splits = [fit_idx] if val_idx is None else [fit_idx, val_idx]
        stats = prob.first_pass(splits, gram=solver == "direct")
        d = _scales(stats, channels, self.kernel_size, source.feat_size)
        n_all = len(source)
        whole = {"n": n_all, "b": sum(st["b"] for st in stats)}
        fit_pc = whole_pc = None  # CG's preconditioners
        if solver == "direct":
            whole["A"] = sum(st["A"] for st in stats)
        else:  # from A omega per split: the fit split's to choose alpha, their sum to refit on every image
            fit_pc, whole_pc = self._preconditioners(prob, splits, d)
        cols = list(range(len(prob.names)))
        self.iterations_, self.residual_ = 0, {}
        chosen = self._choose_alphas(prob, stats, fit_idx, val_idx, solver, d, fit_pc)
        # refit on every training image with each pattern's alpha
        final_alphas = sorted(set(chosen.values()), reverse=True)
        shifts = [a * n_all * prob.trace_m for a in final_alphas]
        if solver == "direct":
            sols = _solve_direct(whole["A"], whole["b"], d, shifts)
            if any(v is None for v in sols):
                raise PosprobeError("the linear probe's system is singular; use a larger alpha")
            sol = {a: v for a, v in zip(final_alphas, sols)}
            res = {}
        else:
            xs, res_t, its = self._cg(prob, torch.arange(n_all), whole["b"], d, shifts, whole_pc)
            self.iterations_ += its
            sol = {a: xs[i] for i, a in enumerate(final_alphas)}
            res = {a: res_t[i] for i, a in enumerate(final_alphas)}
        v = torch.stack([sol[chosen[name]][:, pi] for pi, name in enumerate(prob.names)], 1)  # (D, P)
        train_mse = prob.mse(torch.arange(n_all), v, cols)
        if solver == "cg":
            self.residual_ = {name: float(res[chosen[name]][pi]) for pi, name in enumerate(prob.names)}
        self.readouts_ = {
            name: LinearReadout(channels, self.kernel_size, self.padding, self.feat_size, self.image_size).set_vector(
                v[:, pi].cpu()
            )
            for pi, name in enumerate(prob.names)
        }
        self.alpha_ = chosen
        self.train_mse_ = {name: float(m) for name, m in zip(prob.names, train_mse)}
        self.solver_, self.inputs_ = solver, prob.dim
        self.preconditioner_ = ""  # CG's, for reports
        if solver == "cg":
            self.preconditioner_ = f"Nystrom rank {whole_pc.rank}" if whole_pc else "none"
        self.seconds_ = time.perf_counter() - started
        return self

    def _choose_alphas(
        self,
        prob: _Problem,
        stats: list[dict],
        fit_idx: torch.Tensor,
        val_idx: torch.Tensor | None,
        solver: str,
        d: torch.Tensor,
        fit_pc,
    ) -> dict[str, float]:
        """Each pattern's alpha: solve on the fit split for every alpha, score the held-out split by a forward
        pass (``val_mse_``), keep the strongest ridge within rounding of the best; the weakest alpha when there
        is no held-out split."""
        self.val_mse_: dict[str, dict[float, float]] = {name: {} for name in prob.names}
        chosen = {name: self.alphas[-1] for name in prob.names}
        if val_idx is None:
            return chosen
        fit_st = stats[0]
        shifts = [a * fit_st["n"] * prob.trace_m for a in self.alphas]
        if solver == "direct":
            direct = _solve_direct(fit_st["A"], fit_st["b"], d, shifts)
            solved = [(a, v) for a, v in zip(self.alphas, direct) if v is not None]
        else:
            xs, _, its = self._cg(prob, fit_idx, fit_st["b"], d, shifts, fit_pc)
            self.iterations_ += its
            solved = list(zip(self.alphas, xs))
        if solved:  # held-out MSE by a forward pass: no cancellation, whatever precision A was built in
            cols = list(range(len(prob.names)))
            v_all = torch.cat([v for _, v in solved], 1)  # (D, L*P) columns (alpha, pattern)
            mses = prob.mse(val_idx, v_all, cols * len(solved)).view(len(solved), len(cols))
            for li, (a, _) in enumerate(solved):
                for pi, name in enumerate(prob.names):
                    self.val_mse_[name][a] = float(mses[li, pi])
        for name in prob.names:
            vals = self.val_mse_[name]
            if vals:  # the strongest ridge within rounding of the best held-out MSE (stable across solvers)
                best = min(vals.values())
                chosen[name] = max(a for a, m in vals.items() if m <= best + 1e-6 * abs(best))
        return chosen

    def _preconditioners(
        self, prob: _Problem, splits: Sequence[torch.Tensor], d: torch.Tensor
    ) -> tuple[NystromPreconditioner | None, NystromPreconditioner | None]:
        """For the first split and for all of them (standardised): one pass of ``cg_rank`` columns per split."""
        rank = min(self.cg_rank, prob.dim)
        if not rank:
            return None, None
        omega = sketch_basis(prob.dim, rank, self.seed).to(self.device)
        s = d.rsqrt()[:, None]
        parts = [s * prob.matvec(idx, s * omega) for idx in splits]
        whole = NystromPreconditioner(omega, sum(parts))
        return (NystromPreconditioner(omega, parts[0]) if len(parts) > 1 else whole), whole

    def _cg(
        self,
        prob: _Problem,
        idx: torch.Tensor,
        b: torch.Tensor,
        d: torch.Tensor,
        shifts: Sequence[float],
        precond: NystromPreconditioner | None,
    ):
        """Preconditioned CG in standardised coordinates; returns solutions in original coordinates (L, D, P)."""
        s = d.rsqrt()

        def matvec(v_hat: torch.Tensor) -> torch.Tensor:
            return s[:, None] * prob.matvec(idx, s[:, None] * v_hat)

        x_hat, res, its = conjugate_gradients(
            matvec, s[:, None] * b, shifts, precond, self.cg_tol, self.cg_max_iter, self.progress
        )
        return s[None, :, None] * x_hat, res, its

    def describe(self) -> str:
        """The fit in one line: solver, inputs, each pattern's alpha, the CG passes and residual, the time."""
        info = self.summary()
        pc = info["cg_preconditioner"]
        pc = f"{pc} preconditioner" if pc and pc != "none" else "unpreconditioned"
        cg = (
            f", CG ({pc}) {info['cg_iterations']} passes, residual <= {max(info['cg_residual'].values()):.1e}"
            if info["solver"] == "cg"
            else ""
        )
        return (
            f"linear probe: exact ridge ({info['solver']} solver, {info['inputs']} inputs), alpha per pattern "
            + ", ".join(f"{k} {v:g}" for k, v in info["alpha"].items())
            + f"{cg}, {info['seconds']:.1f} s"
        )

    def summary(self) -> dict:
        """What was fitted, for reports: solver, inputs, alpha, train MSE (and CG passes, residuals, preconditioner)."""
        self._check_fitted()
        converged = all(r <= self.cg_tol for r in self.residual_.values())
        return {
            "solver": self.solver_,
            "inputs": self.inputs_,
            "alpha": self.alpha_,
            "train_mse": self.train_mse_,
            "val_mse": self.val_mse_,
            "cg_iterations": self.iterations_,
            "cg_residual": self.residual_,
            "cg_converged": converged,
            "cg_preconditioner": self.preconditioner_,
            "seconds": self.seconds_,
        }
