"""The diffusion benchmark's hand-written losses are the project's Pyro objectives (L_simple and the
subsampled bound: value and every gradient, same seed, float64), and the benchmark CLI runs end to end."""

from __future__ import annotations

import json
from collections.abc import Callable

import pyro
import pytest
import torch

from experiments import benchmark_diffusion
from experiments.benchmark_diffusion import handwritten_bound_loss, handwritten_simple_loss, make_batch
from experiments.data import DataError
from inference.diffusion_elbo import SubsampledDiffusionELBO
from inference.diffusion_simple import SimpleDiffusionLoss
from ppl_models.gaussian_diffusion import GaussianDiffusion


def tiny(variance: str = "beta", levels: int | None = 256) -> tuple[GaussianDiffusion, torch.Tensor]:
    torch.manual_seed(0)
    pair = GaussianDiffusion(64, num_steps=10, channels=8, mult=(1, 2), groups=4, embed_dim=8, levels=levels,
                             variance=variance).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (5, 64), generator=g).double() / 255
    x[0, :3] = torch.tensor([0.0, 1.0, 1 / 255])  # the outer bins and a neighbour of one
    return pair, x


def loss_and_grads(pair: GaussianDiffusion, fn: Callable[[], torch.Tensor],
                   seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    loss = fn()
    return loss.detach(), list(torch.autograd.grad(loss, list(pair.parameters())))


CASES = [
    ("simple", "beta", 256),
    ("bound", "beta", 256),
    ("bound", "beta_tilde", 256),
    ("bound", "beta", None),
]


@pytest.mark.parametrize(("loss", "variance", "levels"), CASES)
def test_handwritten_loss_equals_pyro_loss(loss: str, variance: str, levels: int | None) -> None:
    pair, x = tiny(variance, levels)
    pyro.clear_param_store()
    objective = SimpleDiffusionLoss() if loss == "simple" else SubsampledDiffusionELBO()
    hand = handwritten_simple_loss if loss == "simple" else handwritten_bound_loss
    ref, ref_grads = loss_and_grads(pair, lambda: objective.differentiable_loss(pair.model, pair.guide, x),
                                    seed=11)
    got, grads = loss_and_grads(pair, lambda: hand(pair, x), seed=11)
    assert ref.dtype == torch.float64 and ref.dim() == 0
    assert abs(float(got - ref)) < 1e-9 * max(1.0, abs(float(ref))), (float(got), float(ref))
    for (name, _), a, b in zip(pair.named_parameters(), grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), (name, float((a - b).abs().max()))
    # The agreement comes from the shared draws: another seed draws other t and noise, another value.
    other, _ = loss_and_grads(pair, lambda: hand(pair, x), seed=12)
    assert abs(float(other - ref)) > 1e-6


def test_make_batch_falls_back_to_random(tmp_path) -> None:
    x, about = make_batch("auto", 3, torch.device("cpu"), 0, str(tmp_path))  # no Fashion-MNIST files there
    assert about.startswith("random") and x.shape == (3, 784)
    assert torch.equal(x * 255, (x * 255).round()) and 0 <= float(x.min()) and float(x.max()) <= 1
    with pytest.raises(DataError):
        make_batch("real", 3, torch.device("cpu"), 0, str(tmp_path))


def test_benchmark_main_writes_outputs(tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    argv = ["--preset", "quick", "--data", "random", "--batch-size", "4", "--repeats", "2", "--warmup", "1",
            "--out", str(out)]
    assert benchmark_diffusion.main(argv) == 0
    result = json.loads((out / "benchmark.json").read_text())
    assert set(result["losses"]) == {"simple", "bound"}
    assert set(result["times_ms"]) == {f"{loss}/{v}" for loss in ("simple", "bound")
                                       for v in benchmark_diffusion.VARIANTS}
    assert all(len(v) == 2 and min(v) > 0 for v in result["times_ms"].values())
    for res in result["losses"].values():
        assert set(res["variants"]) == set(benchmark_diffusion.VARIANTS)
        assert min(res["ratios"].values()) > 0
        assert res["paired_ratios"]["svi_over_handwritten"]["median"] > 0
        # float32, same draws: equal to rounding
        assert res["loss_check"]["rel_diff"] < 1e-4, res["loss_check"]
    assert result["model"]["num_steps"] == 200 and result["batch"]["batch_size"] == 4
    assert result["batch"]["source"] == "random"
    md = (out / "benchmark.md").read_text()
    assert "absolute times only count from a GPU" in md and "ratio to hand-written" in md
    assert md in capsys.readouterr().out
