"""inference.sample_quality against known answers, in float64."""

import math

import pytest
import torch

from inference import sample_quality as sq


def test_frechet_distance_of_gaussians_with_known_answers():
    # 1-D: (m_a - m_b)^2 + (s_a - s_b)^2.
    fd = sq.gaussian_frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]),
                                   torch.tensor([[9.0]]))
    assert fd == pytest.approx(9.0 + 1.0, abs=1e-12)
    # Diagonal covariances: sum of the per-axis answers.
    va, vb = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    ma, mb = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    expected = float((ma - mb).pow(2).sum() + (va.sqrt() - vb.sqrt()).pow(2).sum())
    diagonal = sq.gaussian_frechet_distance(ma, torch.diag(va), mb, torch.diag(vb))
    assert diagonal == pytest.approx(expected, abs=1e-12)
    # Rotating both Gaussians by one orthogonal matrix changes nothing; a Gaussian is 0 from itself.
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    rotated = sq.gaussian_frechet_distance(q @ ma.double(), q @ torch.diag(va).double() @ q.T,
                                           q @ mb.double(), q @ torch.diag(vb).double() @ q.T)
    assert rotated == pytest.approx(expected, abs=1e-10)
    cov = q @ torch.diag(va).double() @ q.T
    assert sq.gaussian_frechet_distance(ma, cov, ma, cov) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_of_samples_converges_to_the_gaussian_answer():
    g = torch.Generator().manual_seed(1)
    n = 200_000
    a = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0], dtype=torch.float64)
    b = torch.randn(n, 2, generator=g, dtype=torch.float64) * 3.0 + torch.tensor([1.0, 0.0],
                                                                                 dtype=torch.float64)
    exact = 1.0 + (1.0 - 3.0) ** 2 + (2.0 - 3.0) ** 2
    assert sq.frechet_distance(a, b) == pytest.approx(exact, abs=0.05)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        sq.frechet_distance(a, b[:, :1])
    with pytest.raises(ValueError, match="N >= 2"):
        sq.frechet_distance(a[:1], b)


def test_class_entropy():
    assert sq.class_entropy(torch.arange(10).repeat(5), 10) == pytest.approx(math.log(10), abs=1e-12)
    assert sq.class_entropy(torch.zeros(7, dtype=torch.long), 10) == 0.0
    assert sq.class_entropy(torch.tensor([0, 0, 1, 1]), 3) == pytest.approx(math.log(2), abs=1e-12)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        sq.class_entropy(torch.tensor([0, 3]), 3)


def test_parzen_window_with_one_centre_is_the_gaussian_density_and_chunking_does_not_matter():
    g = torch.Generator().manual_seed(2)
    centre, points, sigma = torch.randn(1, 5, generator=g), torch.randn(7, 5, generator=g), 0.7
    exact = torch.distributions.Normal(centre.double(), sigma).log_prob(points.double()).sum(-1)
    assert torch.allclose(sq.parzen_log_likelihood(centre, points, sigma), exact, atol=1e-12)
    centres = torch.randn(50, 5, generator=g)
    whole = sq.parzen_log_likelihood(centres, points, sigma)
    chunked = sq.parzen_log_likelihood(centres, points, sigma, chunk_points=2, chunk_centres=7)
    assert torch.allclose(whole, chunked, atol=1e-12)
    brute = torch.logsumexp(torch.distributions.Normal(centres.double(), sigma).log_prob(
        points.double()[:, None]).sum(-1), dim=1) - math.log(50)
    assert torch.allclose(whole, brute, atol=1e-10)
    with pytest.raises(ValueError, match="sigma must be"):
        sq.parzen_log_likelihood(centres, points, 0.0)


def test_parzen_window_matches_a_double_loop():
    centres = [[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]]
    points = [[0.1, 0.9], [3.0, 0.0]]
    sigma = 0.8
    for i, x in enumerate(points):
        total = 0.0
        for c in centres:
            sq_dist = sum((a - b) ** 2 for a, b in zip(x, c, strict=True))
            total += math.exp(-sq_dist / (2 * sigma**2)) / (2 * math.pi * sigma**2)
        expected = math.log(total / len(centres))
        got = sq.parzen_log_likelihood(torch.tensor(centres, dtype=torch.float64),
                                       torch.tensor(points, dtype=torch.float64), sigma, chunk_points=1,
                                       chunk_centres=2)[i]
        assert float(got) == pytest.approx(expected, abs=1e-12)


def test_parzen_sigma_selection_finds_the_bandwidth_of_the_data():
    """Centres and validation points drawn from N(0, 0.3^2 I) in 1-D: with many centres the best window is
    narrow but not the narrowest, and the chosen sigma maximises the validation score."""
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(2000, 1, generator=g) * 0.3
    valid = torch.randn(500, 1, generator=g) * 0.3
    sigma, scores = sq.select_parzen_sigma(centres, valid, grid=[0.001, 0.01, 0.05, 0.1, 1.0])
    assert sigma in (0.05, 0.1) and scores[sigma] == max(scores.values())


def test_reconstruction_mse():
    assert sq.reconstruction_mse(torch.full((2, 3), 0.5), torch.ones(2, 3)) == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"grey levels in \[0, 1\]"):
        sq.reconstruction_mse(torch.full((2,), 2.0), torch.ones(2))


def test_frechet_distance_agrees_with_torchmetrics_fid_code():
    """torchmetrics' FrechetInceptionDistance with our own feature network (no Inception, no torchvision)
    computes the same Fréchet distance."""
    fid = pytest.importorskip("torchmetrics.image.fid")

    class FirstPixels(torch.nn.Module):
        num_features = 3

        def forward(self, x):
            return x.reshape(x.shape[0], -1)[:, :3].double()

    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(500, 3, generator=g), torch.rand(500, 3, generator=g) * 0.5
    metric = fid.FrechetInceptionDistance(feature=FirstPixels(), normalize=True)
    metric.update(a, real=True)
    metric.update(b, real=False)
    assert sq.frechet_distance(a, b) == pytest.approx(float(metric.compute()), rel=1e-8)
