"""The exact linear probe: the closed form is least squares at full resolution, and it beats SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from posprobe.errors import PosprobeError
from posprobe.features.encode import EncodedSet
from posprobe.features.parts import interp_matrix
from posprobe.readouts.joint import train_readouts
from posprobe.readouts.linear import (
    LinearProbe,
    LinearReadout,
    NystromPreconditioner,
    conjugate_gradients,
    sketch_basis,
)
from posprobe.readouts.train import ReadoutJob, TrainConfig
from posprobe.targets import make_target

FEAT, OUT, C = 6, 10, 3


def position_features(n: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, C, FEAT, FEAT, generator=g)
    feats[:, 0] += 2 * torch.linspace(-1, 1, FEAT)[None, None, :]
    feats[:, 1] += 2 * torch.linspace(-1, 1, FEAT)[None, :, None]
    return feats


def numpy_ridge(feats: torch.Tensor, pattern: str, k: int, padding: int, alpha: float) -> np.ndarray:
    """The documented objective built explicitly: stacked U X_i against the full-resolution target, plus
    sqrt(alpha n tr(M) d_j) e_j rows for the standardised ridge; solved by numpy's lstsq."""
    n = feats.shape[0]
    x = F.pad(feats.double(), (padding,) * 4)
    cols = F.unfold(x, k).transpose(1, 2).numpy()  # (n, s^2, C k k)
    cols = np.concatenate([cols, np.ones(cols.shape[:2] + (1,))], 2)
    s = FEAT + 2 * padding - k + 1
    u1 = interp_matrix(OUT, s, False).numpy()
    u = np.kron(u1, u1)  # (OUT^2, s^2): bilinear upsampling of a flattened map
    y = make_target(pattern, OUT, OUT).double().numpy().ravel()
    ms = (feats.double() ** 2).mean((0, 2, 3)).numpy()
    d = np.concatenate([np.repeat(ms, k * k), [1.0]])
    lam = alpha * n * np.trace(u.T @ u)
    a = np.concatenate([u @ cols[i] for i in range(n)] + [np.diag(np.sqrt(lam * d))], 0)
    b = np.concatenate([y] * n + [np.zeros(len(d))])
    return np.linalg.lstsq(a, b, rcond=None)[0]


def vector(readout: LinearReadout) -> np.ndarray:
    conv = readout.head[0]
    return np.concatenate([conv.weight.detach().double().numpy().ravel(), conv.bias.detach().double().numpy()])


@pytest.mark.parametrize("k,padding,alpha", [(3, 0, 1e-3), (3, 1, 0.0), (1, 0, 0.1)])
def test_the_closed_form_is_numpys_least_squares(k, padding, alpha):
    feats = position_features(6)
    probe = LinearProbe(
        None,
        ["H", "G"],
        kernel_size=k,
        padding=padding,
        feat_size=FEAT,
        image_size=OUT,
        alphas=(alpha,),
        solver="direct",
        progress=False,
    ).fit(feats)
    for pattern in ("H", "G"):
        np.testing.assert_allclose(
            vector(probe.readouts_[pattern]), numpy_ridge(feats, pattern, k, padding, alpha), atol=1e-5, rtol=1e-4
        )


def full_resolution_mse(readout, feats: torch.Tensor, pattern: str) -> float:
    with torch.no_grad():
        pred = readout.eval().forward_aligned(feats.float())[:, 0].double()
    return float(((pred - make_target(pattern, OUT, OUT).double()) ** 2).mean())


def test_the_exact_probe_is_no_worse_than_sgd_on_the_same_linear_readout():
    """The closed form is the optimum of the MSE an SGD-trained readout of the same form minimises."""
    feats = position_features(32)
    exact = LinearProbe(
        None, ["H", "V", "G", "HS", "VS"], feat_size=FEAT, image_size=OUT, alphas=(1e-9,), progress=False
    ).fit(feats)
    assert exact.solver_ == "direct"
    for pattern in ("H", "V", "G", "HS", "VS"):
        torch.manual_seed(0)
        job = ReadoutJob(pattern, LinearReadout(C, 3, 0, FEAT, OUT), make_target(pattern, OUT, OUT))
        train_readouts(feats, [job], TrainConfig(epochs=30, lr=0.01, batch_size=8), progress=False)
        sgd = full_resolution_mse(job.readout, feats, pattern)
        best = full_resolution_mse(exact.readouts_[pattern], feats, pattern)
        assert best == pytest.approx(exact.train_mse_[pattern], rel=1e-4)  # the reported MSE is the real one
        assert best <= sgd * (1 + 1e-6), (pattern, best, sgd)


def test_conjugate_gradients_solve_every_shift():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = q @ q.T / 30
    b = torch.randn(30, 2, generator=g, dtype=torch.float64)
    shifts = [1.0, 0.1, 1e-3]
    x, res, _ = conjugate_gradients(lambda v: a @ v, b, shifts, tol=1e-11, max_iter=300)
    for i, shift in enumerate(shifts):
        torch.testing.assert_close(
            x[i], torch.linalg.solve(a + shift * torch.eye(30, dtype=a.dtype), b), rtol=1e-7, atol=1e-8
        )
    assert float(res.max()) < 1e-11


def ill_conditioned(dim: int = 60, n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A = X^T X with X's columns scaled by 1e-3..1e3 and then mixed by a random rotation (eigenvalues over
    12 decades, not aligned with the axes, as in deep features after standardisation); two right-hand sides."""
    g = torch.Generator().manual_seed(seed)
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64)).Q
    scales = torch.logspace(-3, 3, dim, dtype=torch.float64)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) * scales @ rotation.T / n**0.5
    return x.T @ x, torch.randn(dim, 2, generator=g, dtype=torch.float64)


def test_nystrom_preconditioned_cg_matches_the_direct_solve_in_fewer_iterations():
    """Same systems, same tolerance: the preconditioner changes only how many products CG needs. The shift 1e3
    converges long before 1e-2 (the multi-shift recurrences this solver replaced underflowed to NaN there)."""
    a, b = ill_conditioned()
    shifts = [1e3, 1.0, 1e-2]
    omega = sketch_basis(60, 20, seed=0)
    precond = NystromPreconditioner(omega, a @ omega)
    x, res, its = conjugate_gradients(lambda v: a @ v, b, shifts, precond, tol=1e-10, max_iter=5000)
    plain, plain_res, plain_its = conjugate_gradients(lambda v: a @ v, b, shifts, tol=1e-10, max_iter=5000)
    for i, shift in enumerate(shifts):
        exact = torch.linalg.solve(a + shift * torch.eye(60, dtype=a.dtype), b)
        for solution in (x[i], plain[i]):
            assert float((solution - exact).norm() / exact.norm()) < 1e-8
    assert float(res.max()) <= 1e-10 and float(plain_res.max()) <= 1e-10
    assert its * 5 < plain_its, (its, plain_its)  # measured: 165 against 1115


def test_cg_on_native_size_levels_agrees_with_the_direct_solve():
    """The matrix-free solver (one fused pass per product, upsampled levels at native size) = the Gram solve."""
    g = torch.Generator().manual_seed(1)
    levels = [torch.randn(24, 2, 12, 12, generator=g), torch.randn(24, 3, 3, 3, generator=g)]
    levels[0][:, 0] += 2 * torch.linspace(-1, 1, 12)[None, None, :]
    enc = EncodedSet.from_levels("x", levels, FEAT, [str(i) for i in range(24)])
    feats = enc.features
    kw = dict(patterns=["H", "HS"], kernel_size=3, padding=1, feat_size=FEAT, image_size=OUT, progress=False)
    direct = LinearProbe(None, solver="direct", **kw).fit(feats)
    plain = LinearProbe(None, solver="cg", cg_tol=1e-7, cg_rank=0, **kw).fit(enc)
    nystrom = LinearProbe(None, solver="cg", cg_tol=1e-7, cg_rank=8, **kw).fit(enc)  # D = 46: rank 8 is partial
    assert plain.summary()["cg_preconditioner"] == "none" and nystrom.summary()["cg_preconditioner"] == "Nystrom rank 8"
    assert 0 < nystrom.iterations_ < plain.iterations_  # measured: 97 passes against 131
    for cg in (plain, nystrom):
        assert cg.solver_ == "cg" and cg.summary()["cg_converged"]
        assert cg.alpha_ == direct.alpha_
        for pattern in ("H", "HS"):
            assert cg.train_mse_[pattern] == pytest.approx(direct.train_mse_[pattern], rel=1e-4)
            np.testing.assert_allclose(vector(cg.readouts_[pattern]), vector(direct.readouts_[pattern]), atol=1e-4)
            for alpha, m in direct.val_mse_[pattern].items():
                assert cg.val_mse_[pattern][alpha] == pytest.approx(m, rel=1e-4)


def test_auto_picks_direct_for_small_inputs_and_cg_above_the_limit():
    feats = position_features(8)
    kw = dict(patterns=["H"], feat_size=FEAT, image_size=OUT, alphas=(1e-3,), progress=False)
    assert LinearProbe(None, **kw).fit(feats).solver_ == "direct"
    assert LinearProbe(None, max_direct_inputs=10, **kw).fit(feats).solver_ == "cg"


def test_scores_predictions_and_settings():
    feats = position_features(12)
    probe = LinearProbe(None, ["H"], feat_size=FEAT, image_size=OUT, progress=False)
    with pytest.raises(PosprobeError, match="not fitted"):
        probe.predict(feats)
    probe.fit(feats)
    pred = probe.predict(feats)["H"]
    assert pred.shape == (12, OUT, OUT)
    score = probe.score(EncodedSet.from_aligned("t", feats, [f"i{i}" for i in range(12)]))["H"]
    assert score.ids[0] == "i0" and float(score.spc.mean()) > 0.9  # the features carry x: H is linear in it
    assert set(probe.summary()) >= {"solver", "alpha", "train_mse", "val_mse"}
    for bad in (dict(solver="qr"), dict(alphas=()), dict(alphas=(-1.0,)), dict(holdout=1.0), dict(cg_rank=-1)):
        with pytest.raises(PosprobeError):
            LinearProbe(None, ["H"], feat_size=FEAT, image_size=OUT, **bad)


def test_large_direct_solves_use_float32_products_without_losing_the_optimum():
    """Above 4096 inputs the Gram's per-image products are float32; the solution still matches CG's."""
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(8, 460, FEAT, FEAT, generator=g)  # D = 460 * 9 + 1 = 4141
    kw = dict(patterns=["H", "G"], feat_size=FEAT, image_size=OUT, alphas=(1e-2,), progress=False)
    direct = LinearProbe(None, solver="direct", **kw).fit(feats)
    cg = LinearProbe(None, solver="cg", cg_tol=1e-9, **kw).fit(feats)
    assert direct.inputs_ == 4141
    for pattern in ("H", "G"):
        assert direct.train_mse_[pattern] == pytest.approx(cg.train_mse_[pattern], rel=1e-5)
        # 128 equations, 4141 unknowns: weights along near-flat directions may differ at float32 rounding
        np.testing.assert_allclose(vector(direct.readouts_[pattern]), vector(cg.readouts_[pattern]), atol=1e-4)
