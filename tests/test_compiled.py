"""The compiled training step (inference.compiled: the networks through torch.compile, the Pyro objective
eager around them) gives the eager step's loss and gradients at the same draws, in float64; a Trainer with
``compile=True`` trains to the eager Trainer's weights. Single layers are left eager, and the state-dict keys
do not change."""

from __future__ import annotations

import pyro
import pytest
import torch
from torch._dynamo.utils import counters

from inference.compiled import compile_networks
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from inference.train import Trainer
from ppl_models.gpsi import GPSI

X_DIM, BATCH = 12, 6


def _gpsi(seed: int = 0) -> GPSI:
    torch.manual_seed(seed)
    return GPSI(X_DIM, z_dim=3, hidden=(8,), num_steps=2).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(BATCH, X_DIM, generator=g) < 0.4).double()
    mask = (torch.rand(BATCH, X_DIM, generator=g) < 0.5).double()
    return x, mask


def _loss_and_grads(pair: GPSI, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    pyro.clear_param_store()
    torch.manual_seed(7)  # the guide's draws
    loss = PathwiseKL_ELBO().differentiable_loss(pair.model, pair.guide, x, mask)
    return float(loss.detach()), list(torch.autograd.grad(loss, list(pair.parameters())))


def test_compiled_step_gives_the_eager_loss_and_gradients_at_the_same_draws():
    eager, compiled = _gpsi(), _gpsi()
    keys = list(compiled.state_dict())
    names = compile_networks(compiled)
    assert sorted(names) == ["omega", "p_net", "q_net"]  # the MLPs
    assert compile_networks(compiled) == names  # nothing compiled twice
    assert list(compiled.state_dict()) == keys  # checkpoints unchanged
    x, mask = _data()
    loss_e, grads_e = _loss_and_grads(eager, x, mask)
    graphs = counters["stats"]["unique_graphs"]
    loss_c, grads_c = _loss_and_grads(compiled, x, mask)
    assert counters["stats"]["unique_graphs"] > graphs  # torch.compile did trace the networks
    assert loss_c == pytest.approx(loss_e, rel=1e-12)
    for ge, gc in zip(grads_e, grads_c, strict=True):
        assert torch.allclose(gc, ge, rtol=1e-9, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in grads_e)  # the comparison is of real gradients


def test_single_layers_are_left_eager():
    module = torch.nn.Module()
    module.layer = torch.nn.Linear(2, 2)
    module.mlp = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
    assert compile_networks(module) == ["mlp"]
    assert "forward" not in vars(module.layer) and "forward" in vars(module.mlp)


def test_trainer_with_compile_trains_to_the_eager_weights(tmp_path):
    x, mask = _data()
    weights = {}
    for compile_ in (False, True):
        pair = _gpsi()
        trainer = Trainer(pair.model, pair.guide, pair, PathwiseKL_ELBO(), pyro.optim.Adam({"lr": 0.01}),
                          train_data=(x, mask), batch_size=3, epochs=2, seed=0, device="cpu",
                          out_dir=tmp_path / str(compile_), progress=False, compile=compile_)
        metrics = trainer.fit()
        assert trainer.compiled_networks == (["p_net", "q_net", "omega"] if compile_ else [])
        weights[compile_] = ({k: v.clone() for k, v in pair.state_dict().items()}, metrics[-1]["train_loss"])
    (eager, loss_e), (compiled, loss_c) = weights[False], weights[True]
    assert loss_c == pytest.approx(loss_e, rel=1e-10)
    for k, v in eager.items():
        assert torch.allclose(compiled[k], v, rtol=1e-8, atol=1e-10), k


def test_training_and_evaluation_shapes_stay_compiled():
    """Every nn.Sequential shares one code object: training batches of two sizes and evaluation without
    gradients need more graphs than torch's default recompile limit of 8, which compile_networks raises
    (past it, Dynamo would fall back to eager silently)."""
    torch.manual_seed(0)
    pair = GPSI(X_DIM, z_dim=2, hidden=(5,), num_steps=2).double()  # sizes no other test compiles
    compile_networks(pair)
    counters.clear()
    elbo = PathwiseKL_ELBO()
    g = torch.Generator().manual_seed(0)

    def batch(n):
        return ((torch.rand(n, X_DIM, generator=g) < 0.4).double(),
                (torch.rand(n, X_DIM, generator=g) < 0.5).double())

    for _ in range(2):
        for n in (16, 16, 7):
            elbo.differentiable_loss(pair.model, pair.guide, *batch(n)).backward()
        pair.eval()
        with torch.no_grad():
            for n in (50, 13):
                elbo.differentiable_loss(pair.model, pair.guide, *batch(n))
        pair.train()
    assert counters["stats"]["unique_graphs"] >= 6  # three networks, with and without gradients
    assert not any("recompile limit" in reason for reason in counters["unimplemented"])
