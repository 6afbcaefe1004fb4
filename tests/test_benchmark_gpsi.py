"""The GPSI benchmark's hand-written loss is PathwiseKL_ELBO's negative ELBO (value and every gradient, same
seed, float64, both updates, both evaluation orders), and the benchmark CLI writes its ratio keys."""

from __future__ import annotations

import json

import pyro
import pytest
import torch

from experiments import benchmark_gpsi
from experiments.benchmark_gpsi import handwritten_gpsi_loss
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from ppl_models.gpsi import GPSI
from ppl_models.masks import make_mask_process


def tiny(update: str) -> tuple[GPSI, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    gpsi = GPSI(64, z_dim=4, hidden=(16,), num_steps=3, update=update,
                init_mean=torch.rand(64, generator=g) * 0.8 + 0.1).double()
    x = torch.rand(7, 64, generator=g, dtype=torch.float64).bernoulli(generator=g)
    mask = make_mask_process("mar-4", (8, 8)).sample(x, generator=g)
    return gpsi, x, mask


def loss_and_grads(gpsi: GPSI, fn, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    loss = fn()
    return loss.detach(), list(torch.autograd.grad(loss, list(gpsi.parameters())))


@pytest.mark.parametrize("update", ["add", "jump"])
@pytest.mark.parametrize("one_pass", [False, True])
def test_handwritten_loss_equals_pathwise_kl_elbo(update: str, one_pass: bool) -> None:
    gpsi, x, mask = tiny(update)
    pyro.clear_param_store()
    ref, ref_grads = loss_and_grads(
        gpsi, lambda: PathwiseKL_ELBO().differentiable_loss(gpsi.model, gpsi.guide, x, mask), seed=11)
    def hand() -> torch.Tensor:
        return handwritten_gpsi_loss(gpsi, x, mask, one_pass=one_pass)

    got, grads = loss_and_grads(gpsi, hand, seed=11)
    assert ref.dtype == torch.float64
    assert abs(float(got - ref)) < 1e-10, (float(got), float(ref))
    names = [n for n, _ in gpsi.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-8), (name, float((a - b).abs().max()))
    # The agreement comes from the shared path: another seed draws another path and another value.
    other, _ = loss_and_grads(gpsi, hand, seed=12)
    assert abs(float(other - ref)) > 1e-6


def test_benchmark_main_writes_ratios(tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    argv = ["--preset", "quick", "--repeats", "2", "--warmup", "1", "--out", str(out)]
    assert benchmark_gpsi.main(argv) == 0
    result = json.loads((out / "benchmark.json").read_text())
    for key in ("svi_over_handwritten", "differentiable_over_handwritten", "forward_pyro_over_handwritten"):
        assert result["ratios"][key] > 0
    assert set(result["variants"]) == set(benchmark_gpsi.VARIANTS)
    assert all(len(v) == 2 for v in result["times_ms"].values())
    assert result["protocol"] == "ratio measured in one run, interleaved, same batch, same module"
    assert result["loss_check"]["abs_diff"] < 1e-3 * abs(result["loss_check"]["pyro"])
    md = (out / "benchmark.md").read_text()
    assert "ratio to hand-written" in md and md in capsys.readouterr().out
    # A second run into the same --out is refused unless --force.
    with pytest.raises(SystemExit):
        benchmark_gpsi.main(argv)
    assert "--force overwrites it" in capsys.readouterr().err
    assert benchmark_gpsi.main([*argv, "--force"]) == 0
