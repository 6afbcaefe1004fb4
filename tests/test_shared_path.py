"""The model's replay takes p's writer path from the guide (ppl_models.policy_parts.SharedPath) inside the
objectives' guide/model pairs: the writer runs once per step instead of twice, every objective's value and
gradients are those of two separate roll-outs (float64), and the record is never used where it would be
wrong: other draws, another grad mode, after its pair (an optimiser step, Pyro's through ``.data``
included), a model run alone, another batch size."""

from __future__ import annotations

import copy
import pickle

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from experiments.benchmark_steps import build_case
from inference.iwae import IWAE_ELBO
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from ppl_models.base import build_model
from ppl_models.policy_parts import guide_model_pair, shared_paths

CPU = torch.device("cpu")
#: model -> the network the writer path runs (once per step)
WRITERS = {"gpsi-add": "omega", "lstm-add": "writer", "draw-extended-add": "writer"}


def _case(name: str, dtype: torch.dtype = torch.float64):
    if name == "draw-open-loop":
        case = build_case("draw-extended-add", "quick", 4, CPU, seed=0, dtype=dtype)
        module = build_model("draw-open-loop", x_dim=784, z_dim=8, lstm_dim=16, num_steps=3).to(dtype)
        return module, case.inputs
    case = build_case(name, "quick", 4, CPU, seed=0, dtype=dtype)
    return case.module, case.inputs


def _count_calls(module: torch.nn.Module, name: str) -> list[int]:
    calls = [0]
    getattr(module, name).register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _loss_and_grads(module, objective, inputs, seed=0):
    pyro.clear_param_store()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = objective.differentiable_loss(module.model, module.guide, *inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_the_writer_runs_once_per_step(name):
    module, inputs = _case(name)
    calls = _count_calls(module, WRITERS[name])
    PathwiseKL_ELBO().differentiable_loss(module.model, module.guide, *inputs)
    assert calls[0] == module.num_steps  # the guide's roll-out; the model's replay took it
    assert module._path._steps == []  # dropped after the model's roll-out


@pytest.mark.parametrize("name", [*sorted(WRITERS), "draw-open-loop"])
@pytest.mark.parametrize("objective", ["pathwise", "trace", "iwae"])
def test_values_and_gradients_equal_two_separate_roll_outs(name, objective):
    loss = {"pathwise": PathwiseKL_ELBO, "trace": Trace_ELBO, "iwae": lambda: IWAE_ELBO(num_particles=3)}
    module, inputs = _case(name)
    calls = _count_calls(module, WRITERS.get(name, "writer"))
    shared_value, shared = _loss_and_grads(module, loss[objective](), inputs)
    shared_calls, calls[0] = calls[0], 0
    with shared_paths(False):
        value, grads = _loss_and_grads(module, loss[objective](), inputs)
    if objective == "iwae":  # it also traces the guide alone (its reparameterisation check)
        assert calls[0] > shared_calls
    elif objective == "trace":  # Pyro's own objective opens no guide/model pair: nothing shared
        assert (shared_calls, calls[0]) == (2 * module.num_steps, 2 * module.num_steps)
    else:  # the guide's roll-out alone, then both
        assert (shared_calls, calls[0]) == (module.num_steps, 2 * module.num_steps)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_pair_scope_around_pyros_own_objective_shares_too(name):
    module, inputs = _case(name)
    calls = _count_calls(module, WRITERS[name])
    value, grads = _loss_and_grads(module, Trace_ELBO(), inputs)
    calls[0] = 0
    with guide_model_pair():
        shared_value, shared = _loss_and_grads(module, Trace_ELBO(), inputs)
    assert calls[0] == module.num_steps
    assert shared_value == pytest.approx(value, rel=1e-12)
    for n, g in grads.items():
        assert torch.allclose(shared[n], g, rtol=1e-10, atol=1e-12), n
    assert shared_value == pytest.approx(value, rel=1e-12)
    assert shared.keys() == grads.keys()
    for n, g in grads.items():
        assert torch.allclose(shared[n], g, rtol=1e-10, atol=1e-12), n


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_record_does_not_outlive_its_pair_nor_an_optimiser_step(name):
    """Pyro's ClippedAdam (the SVI step's) writes through ``.data``, which no version counter sees: the record
    must already be gone when it steps."""
    module, inputs = _case(name)
    calls = _count_calls(module, WRITERS[name])
    pyro.clear_param_store()
    with guide_model_pair():
        guide_trace = poutine.trace(module.guide).get_trace(*inputs)
        assert len(module._path._steps) > 0
    assert module._path._steps == []  # dropped with its scope
    loss = -poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(*inputs).log_prob_sum()
    loss.backward()
    pyro.optim.ClippedAdam({"lr": 0.5})([p for p in module.parameters() if p.grad is not None])
    calls[0] = 0
    with guide_model_pair():  # even in a new scope, the old trace's draws find no record
        canvases = poutine.replay(module.model, trace=guide_trace)(*inputs)
    assert calls[0] == module.num_steps  # computed afresh with the updated weights
    expected = poutine.replay(module.model, trace=guide_trace)(*inputs)
    assert torch.equal(canvases, expected)
    # A guide run alone records nothing outside a pair.
    poutine.trace(module.guide).get_trace(*inputs)
    assert module._path._steps == []


def test_other_draws_and_another_grad_mode_compute_afresh():
    module, inputs = _case("draw-extended-add")
    calls = _count_calls(module, "writer")
    with guide_model_pair():
        guide_trace = poutine.trace(module.guide).get_trace(*inputs)
        # Draws from z_2 on replaced: z_1's step is q's, every later one is computed.
        other = guide_trace.copy()
        for t in range(2, module.num_steps + 1):
            site = other.nodes[f"z_{t}"]
            other.nodes[f"z_{t}"] = dict(site, value=torch.zeros_like(site["value"]))
        calls[0] = 0
        canvases = poutine.replay(module.model, trace=other)(*inputs)
    assert calls[0] == module.num_steps - 1
    assert torch.equal(canvases, poutine.replay(module.model, trace=other)(*inputs))
    # The guide without gradients, the model with: the model's path must carry gradients, so it is computed.
    with guide_model_pair():
        with torch.no_grad():
            guide_trace = poutine.trace(module.guide).get_trace(*inputs)
        calls[0] = 0
        canvases = poutine.replay(module.model, trace=guide_trace)(*inputs)
    assert calls[0] == module.num_steps and canvases.requires_grad


def test_the_model_alone_another_batch_and_a_copy_start_without_a_record():
    module, inputs = _case("gpsi-add")
    calls = _count_calls(module, "omega")
    with guide_model_pair():
        poutine.trace(module.guide).get_trace(*inputs)
        assert len(module._path._steps) == module.num_steps
        twin = copy.deepcopy(module)  # a recorded path holds non-leaf tensors, which deepcopy refuses
        assert twin._path._steps == []
        assert pickle.loads(pickle.dumps(module._path))._steps == []
        calls[0] = 0
        module.sample(3)  # p alone, another batch size: its own draws, never the record's
        assert calls[0] == module.num_steps
    # The open-loop DRAW generator's constant initial state is not shared: another batch size samples.
    draw, (x,) = _case("draw-open-loop")
    with guide_model_pair():
        poutine.trace(draw.guide).get_trace(x)
        assert draw.sample(3).shape == (3, 784)
        assert draw.model(None, num_samples=2).shape[1] == 2
