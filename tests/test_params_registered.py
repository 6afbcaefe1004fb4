"""Inside ``ppl_models.base.params_registered`` the model and guide do not register their parameters with
Pyro again: the same values and gradients, no param sites in their traces; the Trainer's fused step enters it
after its first step (which registers and checks the parameters), its SVI step never; and the step
benchmark's ``--width-scale`` keeps the step's operations while it narrows the networks."""

from __future__ import annotations

import contextlib
from typing import Any

import pyro
import pytest
import torch
from pyro import poutine

import inference.train as train
from experiments.benchmark_steps import MODELS, build_case, main, narrowed, operation_counts
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from inference.train import Trainer
from ppl_models.base import params_registered

CPU = torch.device("cpu")


def _traces(module: Any, inputs: tuple[torch.Tensor, ...], seed: int = 0) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    guide_trace = poutine.trace(module.guide).get_trace(*inputs)
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(*inputs)
    return guide_trace, model_trace


def _loss_and_grads(module: Any, inputs: tuple[torch.Tensor, ...],
                    seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = PathwiseKL_ELBO().differentiable_loss(module.model, module.guide, *inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


@pytest.mark.parametrize("name", ["gpsi-add", "lstm-add", "draw-extended-add", "vae"])
def test_inside_the_scope_the_traces_have_no_param_sites_and_the_same_values(name):
    pyro.clear_param_store()
    case = build_case(name, "quick", 4, CPU, seed=0, dtype=torch.float64)
    outside = _traces(case.module, case.inputs)
    with params_registered():
        inside = _traces(case.module, case.inputs)
    n_params = len(list(case.module.parameters()))
    for before, after in zip(outside, inside, strict=True):
        assert sum(site["type"] == "param" for site in before.nodes.values()) == n_params
        assert not any(site["type"] == "param" for site in after.nodes.values())
        samples = [k for k, site in before.nodes.items() if site["type"] == "sample"]
        assert samples == [k for k, site in after.nodes.items() if site["type"] == "sample"]
        for k in samples:
            assert torch.equal(before.nodes[k]["value"], after.nodes[k]["value"])
    loss, grads = _loss_and_grads(case.module, case.inputs)
    with params_registered():
        loss_in, grads_in = _loss_and_grads(case.module, case.inputs)
    assert loss == loss_in
    assert grads.keys() == grads_in.keys() and all(torch.equal(grads[k], grads_in[k]) for k in grads)


def test_the_scope_is_restored_after_an_error():
    case = build_case("vae", "quick", 2, CPU, seed=0)
    with pytest.raises(RuntimeError, match="boom"), params_registered():
        raise RuntimeError("boom")
    _, model_trace = _traces(case.module, case.inputs)
    assert any(site["type"] == "param" for site in model_trace.nodes.values())


def _counting_registrations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = pyro.module

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(pyro, "module", counted)
    return calls


@pytest.mark.parametrize("mode", ["fused", "svi"])
@pytest.mark.parametrize("name", ["gpsi-add", "diffusion-gaussian"])
def test_the_fused_step_registers_at_its_first_step_only(tmp_path, monkeypatch, mode, name):
    case = build_case(name, "quick", 16, CPU, seed=0)
    module = case.module
    optimizer = ((lambda params: torch.optim.Adam(params, lr=1e-3)) if mode == "fused"
                 else pyro.optim.Adam({"lr": 1e-3}))
    trainer = Trainer(module.model, module.guide, module, case.objective, optimizer, case.inputs,
                      batch_size=4, epochs=1, seed=0, device="cpu", out_dir=tmp_path, progress=False)
    calls = _counting_registrations(monkeypatch)
    trainer.fit()
    steps = 16 // 4
    per_step = 2 if name == "gpsi-add" else 1  # model and guide; diffusion's loss registers the pair once
    # at the first step only in the fused step, which checks the parameters there; at every step in SVI
    # mode, which finds the parameters to step through Pyro's param messages
    assert calls[0] == (per_step if mode == "fused" else per_step * steps)
    # the store still holds every parameter, as registered at the first step (checkpoints, clip order)
    store = pyro.get_param_store()
    assert {id(store[n]) for n in store.keys()} == {id(p) for p in module.parameters()}


def test_fused_training_is_unchanged_by_the_scope(tmp_path, monkeypatch):
    """The same weights with registration at every step as with the scope (float32, bit for bit)."""

    def train_gpsi(out):
        case = build_case("gpsi-add", "quick", 16, CPU, seed=0)
        trainer = Trainer(case.module.model, case.module.guide, case.module, PathwiseKL_ELBO(),
                          lambda params: torch.optim.Adam(params, lr=1e-3), case.inputs, batch_size=4,
                          epochs=2, seed=0, device="cpu", out_dir=out, progress=False)
        trainer.fit()
        return case.module.state_dict()

    with_scope = train_gpsi(tmp_path / "a")
    with monkeypatch.context() as m:
        m.setattr(train, "params_registered", contextlib.nullcontext)
        without = train_gpsi(tmp_path / "b")
    assert all(torch.equal(with_scope[k], without[k]) for k in with_scope)


# ------------------------------------------------------------------------------ --width-scale


@pytest.mark.parametrize("name", MODELS)
def test_narrowed_networks_run_the_same_operations(name):
    full = build_case(name, "quick", 2, CPU, seed=0)
    narrow = build_case(name, "quick", 2, CPU, seed=0, width_scale=0.1)
    assert (sum(p.numel() for p in narrow.module.parameters())
            < sum(p.numel() for p in full.module.parameters()))
    counts = operation_counts(full, 0)
    assert counts == operation_counts(narrow, 0)


def test_narrowed_keeps_steps_and_the_unet_constraints():
    assert narrowed({"z_dim": 100, "hidden": [1000, 1000], "num_steps": 6}, 0.02) == {
        "z_dim": 2, "hidden": [20, 20], "num_steps": 6}
    assert narrowed({"z_dim": 10, "lstm_dim": 30}, 0.01) == {"z_dim": 1, "lstm_dim": 1}  # at least 1
    unet = narrowed({"channels": 64, "groups": 8, "embed_dim": 128, "num_steps": 1000}, 0.02)
    assert unet == {"channels": 8, "groups": 8, "embed_dim": 2, "num_steps": 1000}
    sizes = {"z_dim": 7}
    assert narrowed(sizes, 1.0) == sizes
    for bad in (0.0, -1.0, 1.5):
        with pytest.raises(ValueError, match=r"width scale must be in \(0, 1\]"):
            narrowed(sizes, bad)


def test_width_scale_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "narrow"
    assert main(["--models", "vae", "--sizes", "quick", "--width-scale", "0.5", "--batch-size", "2",
                 "--repeats", "2", "--warmup", "0", "--no-compile", "--no-progress",
                 "--variants", "handwritten,fused,fused-registering", "--out", str(out)]) == 0
    page = (out / "benchmark.md").read_text()
    assert "widths × 0.5" in page and "fused, registering / registered" in page
    with pytest.raises(SystemExit):
        main(["--width-scale", "2", "--out", str(tmp_path / "x")])
    assert "must be in (0, 1]" in capsys.readouterr().err
    # a resume must name the width it ran with
    with pytest.raises(SystemExit):
        main(["--models", "vae", "--sizes", "quick", "--batch-size", "2", "--repeats", "2", "--warmup", "0",
              "--no-compile", "--no-progress", "--variants", "handwritten,fused,fused-registering",
              "--out", str(out), "--resume"])
    assert "width_scale=0.5 (now 1.0)" in capsys.readouterr().err
