"""Honest and oracular template matching: a brute-force reference, ordering of the modes, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.data import fixed_binarize, load_dataset
from ppl_models.masks import MAR
from ppl_models.template_matching import template_match
from ppl_models.vae import bernoulli_nll


def _ce(x: float, t: float, eps: float = 1e-6) -> float:
    t = min(max(t, eps), 1 - eps)
    return -(x * math.log(t) + (1 - x) * math.log(1 - t))


def _reference(train, x, mask, mode):
    """Double loop in python floats: argmin (first on ties) of the matching score, then the missing NLL."""
    index, nll = [], []
    for b in range(x.shape[0]):
        best, arg = math.inf, -1
        for n in range(train.shape[0]):
            score = 0.0
            for d in range(x.shape[1]):
                w = float(mask[b, d]) if mode == "honest" else 1.0 - float(mask[b, d])
                score += w * _ce(float(x[b, d]), float(train[n, d]))
            if score < best:
                best, arg = score, n
        index.append(arg)
        missing = [1 - float(mask[b, d]) for d in range(x.shape[1])]
        nll.append(sum(w * _ce(float(x[b, d]), float(train[arg, d])) for d, w in enumerate(missing)))
    return torch.tensor(index), torch.tensor(nll, dtype=torch.float64)


def _small_case():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(7, 12, generator=g, dtype=torch.float64)
    train[0, 0], train[1, 1] = 0.0, 1.0  # exercise the eps clamp
    # Templates 2 and 5 are identical and sit at the same position of two blocks of chunk_size=3, so the
    # tie is exact and must go to the lower index across blocks.
    train[5] = train[2]
    x = torch.rand(5, 12, generator=g, dtype=torch.float64)
    x[1] = torch.bernoulli(train[2], generator=g)  # binary rows too
    x[1, :6] = (train[2, :6] > 0.5).double()  # and closest to the tied pair
    x[2] = (x[2] > 0.5).double()
    mask = (torch.rand(5, 12, generator=g) > 0.4).double()
    mask[3] = 0.0  # honest mode: every template scores exactly 0, so all tie -> index 0
    mask[4] = 1.0  # nothing missing
    return train, x, mask


@pytest.mark.parametrize("mode", ["honest", "oracular"])
def test_matches_brute_force_reference_with_chunking_and_ties(mode):
    train, x, mask = _small_case()
    ref_index, ref_nll = _reference(train, x, mask, mode)
    for chunk_size in (3, 4, 100):
        res = template_match(train, x, mask, mode=mode, chunk_size=chunk_size)
        assert torch.equal(res.index, ref_index), (chunk_size, res.index, ref_index)
        torch.testing.assert_close(res.nll, ref_nll, rtol=1e-12, atol=1e-12)
        expected = torch.where(mask.bool(), x, train[ref_index])
        assert torch.equal(res.imputation, expected)
    # Rows whose matching set is empty (all missing for honest, all known for oracular) tie everywhere.
    assert res.index[3 if mode == "honest" else 4] == 0
    # The tie between the identical templates 2 and 5 is hit, and resolved to 2.
    assert 2 in res.index.tolist() and 5 not in res.index.tolist()


def test_tie_between_identical_templates_across_blocks_goes_to_lower_index():
    train, x, mask = _small_case()
    x = train[2:3].clone()
    mask = torch.ones(1, 12, dtype=torch.float64)
    mask[0, :3] = 0
    for mode in ("honest", "oracular"):
        for chunk_size in (1, 2, 3, 7):
            assert template_match(train, x, mask, mode=mode, chunk_size=chunk_size).index.item() == 2


def test_oracular_never_worse_than_honest_and_full_mask_scores_zero():
    data = load_dataset("digits")
    train, x = data.train, fixed_binarize(data.test[:40])
    mask = MAR(4, data.image_shape).sample(x, torch.Generator().manual_seed(0))
    honest = template_match(train, x, mask, mode="honest", chunk_size=500)
    oracle = template_match(train, x, mask, mode="oracular", chunk_size=500)
    assert (oracle.nll <= honest.nll + 1e-5).all()
    assert (oracle.nll < honest.nll).any()
    assert honest.nll.shape == (40,) and honest.index.dtype == torch.long
    # The score is the Bernoulli NLL of the missing pixels under the imputation (the library's scorer, in
    # float64: in float32, 1 - eps rounds to 1 - 1.013e-6, which moves a clamped pixel's CE by 0.013).
    scored = bernoulli_nll(x.double(), honest.imputation.double(), 1 - mask.double())
    torch.testing.assert_close(scored.float(), honest.nll)
    assert torch.equal(honest.imputation[mask.bool()], x[mask.bool()])

    full = template_match(train, x, torch.ones_like(x), mode="honest", chunk_size=500)
    assert torch.equal(full.nll, torch.zeros(40)) and torch.equal(full.imputation, x)


def test_bad_arguments_raise():
    train, x, mask = _small_case()
    with pytest.raises(ValueError, match="honest.*oracular"):
        template_match(train, x, mask, mode="oracle")
    with pytest.raises(ValueError, match="pixels per row"):
        template_match(train[:, :10], x, mask)
    with pytest.raises(ValueError, match="mask shape"):
        template_match(train, x, mask[:, :10])
    with pytest.raises(ValueError, match="0 \\(missing\\) or 1"):
        template_match(train, x, mask * 0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        template_match(train, x, mask, chunk_size=0)
    with pytest.raises(ValueError, match="grey levels"):
        template_match(train, x * 2, mask)
