"""Reliability diagram and expected calibration error (inference.calibration; Guo et al. 2017, Sec. 2):
known answers, the binning, the mask, and the errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from inference import Reliability, reliability


def uniform_truth(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n probabilities p ~ U(0, 1) and outcomes y ~ Bernoulli(p), float64, seeded."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, generator=g, dtype=torch.float64)
    return p, torch.bernoulli(p, generator=g)


def test_constant_prediction_against_all_ones_has_ece_of_its_distance_to_one():
    prob = torch.full((50, 64), 0.9, dtype=torch.float64)
    r = reliability(prob, torch.ones(50, 64))
    assert r.ece == pytest.approx(0.1, abs=1e-12) and r.mce == pytest.approx(0.1, abs=1e-12)
    assert r.num == 3200 and r.num_bins == 10
    # Everything lands in bin (0.8, 0.9]: right-closed bins.
    assert r.count.tolist() == [0] * 8 + [3200, 0]
    assert r.freq[8] == 1.0 and r.mean_prob[8] == pytest.approx(0.9, abs=1e-12)
    assert torch.isnan(r.freq[:8]).all() and torch.isnan(r.mean_prob[9])
    # The same predictor is perfectly calibrated on outcomes that are 1 nine times in ten.
    y = torch.zeros(3200)
    y[: 2880] = 1
    assert reliability(prob, y.view(50, 64)).ece == pytest.approx(0.0, abs=1e-12)


def test_hand_computed_example_and_bin_edges():
    # Bins of 4: (0, .25], (.25, .5], (.5, .75], (.75, 1]; 0 goes into the first, an edge into the lower bin.
    prob = torch.tensor([0.0, 0.25, 0.3, 0.5, 0.6, 1.0], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 0, 1, 1])
    r = reliability(prob, y, num_bins=4)
    assert r.count.tolist() == [2, 2, 1, 1]
    torch.testing.assert_close(r.mean_prob, torch.tensor([0.125, 0.4, 0.6, 1.0], dtype=torch.float64))
    torch.testing.assert_close(r.freq, torch.tensor([0.5, 0.0, 1.0, 1.0], dtype=torch.float64))
    # ECE = (2/6)|0.5 − 0.125| + (2/6)|0 − 0.4| + (1/6)|1 − 0.6| + 0
    assert r.ece == pytest.approx((2 * 0.375 + 2 * 0.4 + 0.4) / 6, abs=1e-15)
    assert r.mce == pytest.approx(0.4, abs=1e-15)
    torch.testing.assert_close(r.edges, torch.linspace(0, 1, 5, dtype=torch.float64))
    # One bin: ECE = |mean(y) − mean(p)|.
    one = reliability(prob, y, num_bins=1)
    assert one.ece == pytest.approx(abs(3 / 6 - 2.65 / 6), abs=1e-15) and one.count.tolist() == [6]


def test_calibrated_predictor_has_small_ece():
    # p ~ U(0, 1), y ~ Bernoulli(p): calibrated, so the ECE is only the sampling noise of the bin
    # frequencies, about Σ_b (n_b/N) · 0.8 · sqrt(acc_b (1 − acc_b) / n_b) ≈ 1e-3 for N = 1e6 in 10 bins.
    p, y = uniform_truth(1_000_000, seed=0)
    r = reliability(p, y)
    assert r.ece < 0.004
    assert (r.count > 90_000).all() and r.count.sum() == 1_000_000
    torch.testing.assert_close(r.freq, r.mean_prob, atol=0.006, rtol=0)  # ~4 SD of a bin's frequency


@pytest.mark.parametrize("num_bins", [1, 10, 25])
def test_overconfident_predictor_matches_the_analytic_ece(num_bins):
    # Truth p ~ U(0, 1), prediction q = p² (too low everywhere). P(y = 1 | q) = √q ≥ q, so every bin's gap
    # has the same sign and the ECE is E[p − p²] = 1/2 − 1/3 = 1/6 for any binning. Its estimate is a mean
    # of N terms y − q with SD ≈ sqrt(0.21 / N) ≈ 4.6e-4 at N = 1e6: tolerance 0.0025 is ~5 SD.
    p, y = uniform_truth(1_000_000, seed=1)
    r = reliability(p * p, y, num_bins=num_bins)
    assert r.ece == pytest.approx(1 / 6, abs=0.0025)
    # Per bin (a, c]: conf = (c^1.5 − a^1.5) / (3 (√c − √a)), acc = (c − a) / (2 (√c − √a)).
    a, c = r.edges[:-1], r.edges[1:]
    mass = c.sqrt() - a.sqrt()
    torch.testing.assert_close(r.mean_prob, (c**1.5 - a**1.5) / (3 * mass), atol=0.002, rtol=0)
    # The smallest bin (25 bins: the last, ~2e4 entries) has a frequency SD of ~0.0035: 0.02 is > 5 SD.
    torch.testing.assert_close(r.freq, (c - a) / (2 * mass), atol=0.02, rtol=0)
    # A calibrated predictor scores far lower on the same outcomes: the test can fail.
    assert reliability(p, y, num_bins=num_bins).ece < 0.01


def test_mask_selects_the_scored_entries_and_ignores_the_rest():
    p, y = uniform_truth(4000, seed=2)
    prob, target = (p * p).view(40, 100), y.view(40, 100)
    select = torch.rand(40, 100, generator=torch.Generator().manual_seed(3)) < 0.3
    # Values outside the selection are not read: garbage there changes nothing.
    junk_prob = torch.where(select, prob, torch.tensor(math.nan, dtype=torch.float64))
    junk_target = torch.where(select, target, torch.tensor(7.0, dtype=torch.float64))
    r = reliability(junk_prob, junk_target, mask=select)
    ref = reliability(prob[select], target[select])
    assert r.num == int(select.sum()) and r.ece == ref.ece and torch.equal(r.count, ref.count)
    # A 0/1 float mask (the imputation code's 1 − m) is the same selection.
    assert reliability(junk_prob, junk_target, mask=select.double()).ece == ref.ece
    # And the selection matters: the complement scores differently.
    assert reliability(prob, target, mask=~select).ece != ref.ece


def test_accepts_float32_and_numpy_and_round_trips_to_json():
    p, y = uniform_truth(1000, seed=4)
    r32 = reliability(p.float(), y.float())
    rnp = reliability(p.numpy(), y.numpy().astype(np.int64))
    assert rnp.ece == reliability(p, y).ece and r32.mean_prob.dtype == torch.float64
    assert isinstance(r32, Reliability)
    d = json.loads(json.dumps(reliability(torch.tensor([0.05, 0.95], dtype=torch.float64),
                                          torch.tensor([0, 1])).to_dict()))
    assert d["num_pixels"] == 2 and d["num_bins"] == 10 and len(d["bin_edges"]) == 11
    assert d["bin_count"] == [1] + [0] * 8 + [1] and d["bin_mean_prob"][1] is None
    assert d["ece"] == pytest.approx(0.05) and d["bin_freq"][0] == 0.0 and d["bin_freq"][9] == 1.0


@pytest.mark.parametrize(
    "prob,target,kwargs,match",
    [
        (torch.tensor([0.5, 1.2]), torch.tensor([0, 1]), {}, r"\[0, 1\]"),
        (torch.tensor([-0.1, 0.2]), torch.tensor([0, 1]), {}, r"\[0, 1\]"),
        (torch.tensor([math.nan, 0.2]), torch.tensor([0, 1]), {}, "NaN"),
        (torch.tensor([0.5, 0.2]), torch.tensor([0, 1, 1]), {}, "same shape"),
        (torch.tensor([0.5, 0.2]), torch.tensor([0.0, 0.4]), {}, "0 or 1"),
        (torch.tensor([0.5, 0.2]), torch.tensor([0, 1]), {"num_bins": 0}, "num_bins"),
        (torch.tensor([0.5, 0.2]), torch.tensor([0, 1]), {"num_bins": True}, "num_bins"),
        (torch.tensor([0.5, 0.2]), torch.tensor([0, 1]), {"mask": torch.zeros(2)}, "selects nothing"),
        (torch.tensor([]), torch.tensor([]), {}, "selects nothing"),
        (torch.tensor([0.5, 0.2]), torch.tensor([0, 1]), {"mask": torch.ones(3)}, "mask must have"),
        (torch.tensor([0.5, 0.2]), torch.tensor([0, 1]), {"mask": torch.tensor([0.5, 1.0])}, "only 0 and 1"),
    ],
)
def test_bad_inputs_raise(prob, target, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reliability(prob, target, **kwargs)


# ------------------------------------------------------------------------ the imputation experiment


def test_imputation_cells_and_table_report_calibration(tmp_path):
    from experiments import imputation, imputation_table
    from experiments.data import fixed_binarize, load_dataset
    from ppl_models.masks import make_mask_process
    from ppl_models.template_matching import template_match

    out = tmp_path / "table"
    args = ["--preset", "quick", "--masks", "mar-4", "--methods", "tm-honest", "tm-oracular", "--eval-limit",
            "40", "--no-sweep", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert imputation_table.main(args) == 0
    cell = json.loads((out / "mar-4" / "tm-honest" / "result.json").read_text())
    c = cell["calibration"]
    assert c["num_pixels"] == 40 * 16 == sum(c["bin_count"]) and c["num_bins"] == imputation.CALIBRATION_BINS
    assert "matched on the known pixels" in c["predicted"] and "binarised test pixel" in c["target"]
    # The same numbers from the method itself: the template's grey levels on the hidden pixels against the
    # fixed binarisation of the test images.
    data = load_dataset("digits")
    x = fixed_binarize(data.test[:40])
    m = imputation.test_masks(make_mask_process("mar-4", data.image_shape), x)
    tm = template_match(data.train, x, m, mode="honest")
    ref = reliability(tm.imputation, x, mask=1 - m)
    assert c["ece"] == pytest.approx(ref.ece, abs=1e-12) and c["bin_count"] == ref.count.tolist()
    assert 0 < c["ece"] < 0.5 and "ECE hidden px" in (out / "mar-4" / "tm-honest" / "result.md").read_text()
    # The results page: the ECE table, table.json, and the figure.
    table = json.loads((out / "table.json").read_text())
    assert table["calibration"]["mar-4"]["tm-honest"]["ece"] == c["ece"]
    md = (out / "table.md").read_text()
    assert "## Calibration of the imputations" in md and f"{c['ece']:.4f} (640 px)" in md
    assert "![calibration](calibration.png)" in md and (out / "calibration.png").stat().st_size > 1000
    # A cell written before calibration existed is reported as not measured, not an error.
    del cell["calibration"]
    (out / "mar-4" / "tm-honest" / "result.json").write_text(json.dumps(cell))
    assert imputation_table.main([*args, "--report-only"]) == 0
    md = (out / "table.md").read_text()
    assert imputation.NOT_MEASURED in md
    assert json.loads((out / "table.json").read_text())["calibration"]["mar-4"]["tm-honest"] is None


def test_calibration_figure_and_section_without_measured_cells(tmp_path):
    from experiments import imputation, imputation_table

    cells = {"mar-4": {"gpsi-add": {"method": "gpsi-add"}}}
    assert not imputation_table.plot_calibration(cells, ["mar-4"], ["gpsi-add"], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
    text = "\n".join(imputation_table.calibration_lines(cells, ["mar-4", "mcar-80"], ["gpsi-add"], False))
    assert f"| GPSI-add | {imputation.NOT_MEASURED} | – |" in text and "calibration.png" not in text
