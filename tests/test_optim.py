"""inference.optim.ClippedAdam against Pyro's per-parameter ClippedAdam, in float64."""

import pytest
import torch
from pyro.optim.clipped_adam import ClippedAdam as PyroClippedAdam

from inference.host_sync import host_syncs
from inference.optim import ClippedAdam

SETTINGS = [
    dict(lr=0.05, betas=(0.9, 0.98), lrd=0.97, clip_norm=0.4),  # the experiments' shape: decay, a clamp
    dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1, centered_variance=True, eps=1e-3),
]


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64))
            for shape in [(3, 4), (5,), (), (2, 2, 2)]]


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("settings", SETTINGS)
def test_updates_equal_pyros_per_parameter_optimisers(settings, capturable):
    ours, theirs = _params(0), _params(0)
    opt = ClippedAdam(ours, **settings, capturable=capturable)
    per_param = [PyroClippedAdam([p], **settings) for p in theirs]
    g = torch.Generator().manual_seed(1)
    for step in range(12):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in ours]
        skipped = step % 3 == 1  # the third parameter gets no gradient on some steps
        for i, (a, b, grad) in enumerate(zip(ours, theirs, grads, strict=True)):
            a.grad = None if skipped and i == 2 else grad.clone()
            b.grad = None if skipped and i == 2 else grad.clone()
        opt.step()
        for b, o in zip(theirs, per_param, strict=True):
            if b.grad is not None:  # as the Trainer calls Pyro's optimisers: only for reached parameters
                o.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
    assert opt.state[ours[2]]["step"].item() == 12 - 4  # steps 1, 4, 7, 10 skipped it
    assert opt.state[ours[0]]["step"].device == ours[0].device


@pytest.mark.parametrize("capturable", [False, True])
def test_state_dict_resumes_exactly(capturable):
    a, b = _params(0), _params(0)
    opt_a = ClippedAdam(a, lr=0.1, lrd=0.9, capturable=capturable)
    opt_b = ClippedAdam(b, lr=0.1, lrd=0.9, capturable=capturable)
    g = torch.Generator().manual_seed(2)
    grads = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in a] for _ in range(6)]

    def step(params, opt, gs):
        for p, grad in zip(params, gs, strict=True):
            p.grad = grad.clone()
        opt.step()

    for gs in grads:
        step(a, opt_a, gs)
    for gs in grads[:3]:
        step(b, opt_b, gs)
    resumed = ClippedAdam(b, lr=0.1, lrd=0.9, capturable=capturable)
    resumed.load_state_dict(opt_b.state_dict())
    assert resumed.state[b[0]]["step"].dtype == torch.float64
    for gs in grads[3:]:
        step(b, resumed, gs)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_the_capturable_step_reads_nothing_back_to_the_host():
    params = _params(0)
    for capturable, reads in ((True, []), (False, ["item"] * len(params))):
        opt = ClippedAdam(params, lr=0.1, lrd=0.9, weight_decay=0.01, centered_variance=True,
                          capturable=capturable)
        for p in params:
            p.grad = torch.ones_like(p)
        _, found = host_syncs(opt.step)
        assert [f.call for f in found] == reads


def test_a_checkpoint_moves_between_the_two_ways():
    a, b = _params(0), _params(0)
    opt_a = ClippedAdam(a, lr=0.1, lrd=0.9, capturable=False)
    opt_b = ClippedAdam(b, lr=0.1, lrd=0.9, capturable=True)
    g = torch.Generator().manual_seed(4)
    for i in range(6):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in a]
        for x, y, grad in zip(a, b, grads, strict=True):
            x.grad, y.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
        if i == 2:  # swap the states: each optimiser goes on from the other's
            state_a, state_b = opt_a.state_dict(), opt_b.state_dict()
            opt_a.load_state_dict(state_b)
            opt_b.load_state_dict(state_a)
            assert opt_a.param_groups[0]["capturable"] is False  # the groups' own setting is kept
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad", [dict(lr=0), dict(betas=(0.9, 1.0)), dict(clip_norm=-1), dict(lrd=0),
                                 dict(eps=-1e-8), dict(weight_decay=-1)])
def test_bad_settings_are_named(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=f"invalid {key}"):
        ClippedAdam(_params(0), **bad)


def test_float32_parameters_follow_pyros_to_round_off():
    # The capturable form keeps its step counters in float64 and divides float32 tensors by the rates cast
    # to float32; Pyro computes the rate in Python floats. After 50 decaying steps they agree to round-off.
    g = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(50, 30, generator=g)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = ClippedAdam(ours, lr=1e-2, lrd=0.99, clip_norm=1e12, capturable=True)
    per_param = [PyroClippedAdam([p], lr=1e-2, lrd=0.99, clip_norm=1e12) for p in theirs]
    for _ in range(50):
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        for o in per_param:
            o.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=2e-6)


def test_the_trainers_fused_step_is_bit_identical_to_its_svi_step(tmp_path, monkeypatch):
    """``--step fused`` and ``--step svi`` through the experiments' ``train_best``, in float32, with the
    global-norm clip active on every step: the same weights bit for bit (the Trainer's two modes sum the
    gradient norm in one parameter order)."""
    import pyro

    from experiments.benchmark_steps import build_case
    from experiments.common import train_best

    monkeypatch.setenv("SEQGEN_VALIDATE", "0")
    data = torch.rand(64, 28 * 28, generator=torch.Generator().manual_seed(1))
    config = {"seed": 0, "eval": {"batch_size": 32},
              "train": {"epochs": 2, "batch_size": 16, "lr": 1e-2, "lr_final": 1e-3, "clip_norm": 1.0}}

    def train(step: str) -> tuple[list[torch.Tensor], list[float]]:
        monkeypatch.setenv("SEQGEN_STEP", step)
        case = build_case("gpsi-add", "quick", 16, torch.device("cpu"), seed=0)
        mask = case.inputs[1][:1]
        pyro.clear_param_store()

        def transform(batch, generator):
            return torch.bernoulli(batch, generator=generator), mask.expand(batch.shape[0], -1)

        def valid_nll(x, m):
            return case.objective.loss(case.module.model, case.module.guide, x, m) * torch.ones(())

        r = train_best(case.module, case.objective, valid_nll, config, data, transform,
                       (data[:32].round(), mask.expand(32, -1)), tmp_path / step, "cpu", False, False,
                       use_best=False)
        return [p.detach().clone() for p in case.module.parameters()], [m["train_loss"] for m in r["metrics"]]

    svi_weights, svi_losses = train("svi")
    fused_weights, fused_losses = train("fused")
    assert svi_losses == fused_losses
    for a, b in zip(svi_weights, fused_weights, strict=True):
        assert torch.equal(a, b)
