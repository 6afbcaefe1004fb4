"""MIWAE: site structure, the model reads only known pixels, importance-sampling imputation against
1-D quadrature, and a short training run through the library's Trainer with IWAE_ELBO on (x, mask)."""

from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F

from experiments.data import dynamic_binarize, fixed_binarize, load_dataset
from inference.iwae import IWAE_ELBO, iter_log_weights
from inference.train import Trainer
from ppl_models.masks import MAR, MCAR
from ppl_models.miwae import MIWAE, miwae_impute


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()


def _digits_batch(n=6, seed=1):
    data = load_dataset("digits")
    x = fixed_binarize(data.test[:n])
    mask = MAR(4, data.image_shape).sample(x, torch.Generator().manual_seed(seed))
    return x, mask


def _traces(miwae, x, mask):
    guide_trace = poutine.trace(miwae.guide).get_trace(x, mask)
    model_trace = poutine.trace(poutine.replay(miwae.model, trace=guide_trace)).get_trace(x, mask)
    return guide_trace, model_trace


def test_model_and_guide_share_z0_and_model_observes_x():
    miwae = MIWAE(x_dim=64, z_dim=4, hidden=(16,))
    x, mask = _digits_batch()
    guide_trace, model_trace = _traces(miwae, x, mask)
    sites = {n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and n != "data"}
    assert sites == {"z_0"}
    sites = {n for n, s in model_trace.nodes.items() if s["type"] == "sample" and n != "data"}
    assert sites == {"z_0", "x"}
    assert guide_trace.nodes["z_0"]["value"].shape == model_trace.nodes["z_0"]["value"].shape == (6, 4)
    assert model_trace.nodes["x"]["is_observed"]
    with pytest.raises(ValueError, match="mask shape"):
        miwae.model(x, mask[:, :10])


def test_missing_pixels_are_never_read():
    miwae = MIWAE(x_dim=64, z_dim=4, hidden=(16,))
    x, mask = _digits_batch()
    missing = ~mask.bool()
    flipped = torch.where(missing, 1 - x, x)
    nan = torch.where(missing, torch.nan, x)
    guide_trace, model_trace = _traces(miwae, x, mask)
    model_trace.compute_log_prob()
    for other in (flipped, nan):
        g = poutine.trace(poutine.replay(miwae.guide, trace=guide_trace)).get_trace(other, mask)
        m = poutine.trace(poutine.replay(miwae.model, trace=guide_trace)).get_trace(other, mask)
        g.compute_log_prob()
        m.compute_log_prob()
        fn, ref_fn = g.nodes["z_0"]["fn"].base_dist, guide_trace.nodes["z_0"]["fn"].base_dist
        assert torch.equal(fn.loc, ref_fn.loc) and torch.equal(fn.scale, ref_fn.scale)
        for site in ("z_0", "x"):
            assert torch.equal(m.nodes[site]["log_prob"], model_trace.nodes[site]["log_prob"])
    # The observation term is exactly the Bernoulli log-likelihood of the known pixels.
    logits = miwae.decode(guide_trace.nodes["z_0"]["value"])
    known_ll = -(F.binary_cross_entropy_with_logits(logits, x, reduction="none") * mask).sum(-1)
    torch.testing.assert_close(model_trace.nodes["x"]["log_prob"], known_ll)
    # NaN in the missing pixels gives finite gradients of the training loss as well.
    loss = IWAE_ELBO(num_particles=3).differentiable_loss(miwae.model, miwae.guide, nan, mask)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in miwae.parameters())


def _quadrature(miwae, x, mask, num_points=48001, half_width=12.0):
    """Exact log p(x_u | x_k) and E[σ(decoder(z)) | x_k] for z_dim = 1 on a uniform grid over z."""
    z = torch.linspace(-half_width, half_width, num_points, dtype=torch.float64)[:, None]
    with torch.no_grad():
        logits = miwae.decode(z)[:, None, :].expand(-1, x.shape[0], -1)  # (G, B, D)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    log_prior = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)  # (G, 1); the grid step cancels in the ratios
    log_joint_k = (log_px * mask).sum(-1) + log_prior  # log p(x_k | z) p(z), (G, B)
    log_joint = log_px.sum(-1) + log_prior
    log_lik = torch.logsumexp(log_joint, 0) - torch.logsumexp(log_joint_k, 0)
    post = torch.softmax(log_joint_k, 0)  # p(z | x_k) on the grid
    mean = torch.einsum("gb,gbd->bd", post, torch.sigmoid(logits))
    return log_lik, mean


def test_log_lik_and_imputation_agree_with_quadrature():
    torch.manual_seed(0)
    miwae = MIWAE(x_dim=6, z_dim=1, hidden=(4,)).double()
    with torch.no_grad():  # a sharper decoder, so that the known pixels move the posterior
        for p in miwae.decoder.parameters():
            p.mul_(3)
    x = torch.tensor(
        [[1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 1, 0], [0.3, 0.9, 0.5, 0.1, 1, 0]],
        dtype=torch.float64,
    )
    mask = torch.tensor(
        [[1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float64
    )
    exact_ll, exact_mean = _quadrature(miwae, x, mask)
    # chunk_size and batch_size below K and B exercise the running accumulators and the row blocks.
    gen = torch.Generator().manual_seed(0)
    res = miwae_impute(miwae, x, mask, num_samples=20000, chunk_size=3000, batch_size=3, generator=gen)
    assert res.num_samples == 20000 and res.log_lik.dtype == torch.float64
    # Tolerance: over 30 generator seeds the error of log_lik at K = 20000 had SD <= 0.012 nats (max
    # |error| 0.022), the error of the imputation is of the same order; 0.06 is ~5 SD. The grid (step
    # 5e-4 over [-12, 12]) is exact to far below that. Bugs such as a missing log q or log p(z) term, or
    # unnormalised weights, move these numbers by tenths of a nat or more.
    torch.testing.assert_close(res.log_lik, exact_ll, atol=0.06, rtol=0)
    torch.testing.assert_close(res.imputation[~mask.bool()], exact_mean[~mask.bool()], atol=0.03, rtol=0)
    assert res.log_lik[3] == 0 and torch.equal(res.imputation[3], x[3])  # nothing missing


def test_imputation_keeps_known_pixels_and_full_mask_returns_x():
    miwae = MIWAE(x_dim=64, z_dim=4, hidden=(16,))
    x, mask = _digits_batch()
    res = miwae_impute(miwae, x, mask, num_samples=50, chunk_size=16)
    assert res.log_lik.shape == (6,) and torch.isfinite(res.log_lik).all() and (res.log_lik < 0).all()
    assert torch.equal(res.imputation[mask.bool()], x[mask.bool()])
    missing = res.imputation[~mask.bool()]
    assert ((missing > 0) & (missing < 1)).all()
    full = miwae_impute(miwae, x, torch.ones(64), num_samples=20)
    assert torch.equal(full.imputation, x) and torch.equal(full.log_lik, torch.zeros(6))
    with pytest.raises(ValueError, match="num_samples"):
        miwae_impute(miwae, x, mask, num_samples=0)


def test_short_training_lowers_the_miwae_bound(tmp_path):
    data = load_dataset("digits")
    torch.manual_seed(0)
    miwae = MIWAE(x_dim=64, z_dim=4, hidden=(32,))
    elbo = IWAE_ELBO(num_particles=5)
    process = MCAR(50, data.image_shape)

    def transform(batch, generator):
        (x,) = batch
        return dynamic_binarize(x, generator), process.sample(x, generator)

    x_eval = fixed_binarize(data.valid[:100])
    mask_eval = process.sample(x_eval, torch.Generator().manual_seed(3))

    def bound():
        pyro.set_rng_seed(1)
        return elbo.loss(miwae.model, miwae.guide, x_eval, mask_eval) / 100

    before = bound()
    assert math.isfinite(before)
    trainer = Trainer(
        miwae.model, miwae.guide, miwae, elbo, lambda ps: torch.optim.Adam(ps, lr=1e-2),
        train_data=(data.train[:512],), batch_size=64, epochs=5, seed=0, device="cpu",
        out_dir=tmp_path, transform=transform, progress=False,
    )  # fmt: skip
    metrics = trainer.fit()
    after = bound()
    assert trainer.step == 40
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert math.isfinite(after) and after < before - 3.0
    # The importance-weight iterator takes (x, mask) tuples too.
    (rows, log_w), = list(iter_log_weights(miwae.model, miwae.guide, (x_eval, mask_eval), num_samples=7))
    assert rows == slice(0, 100) and log_w.shape == (7, 100) and torch.isfinite(log_w).all()
