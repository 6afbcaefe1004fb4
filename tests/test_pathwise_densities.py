"""PathwiseKL_ELBO computes only the densities its estimator reads (inference.pathwise_kl_elbo).

With Pyro's validation off (the training step's default) the objective traces the guide and the model
without Pyro's eager densities and then computes each site's ``log_prob`` / ``score_parts`` only where a
term reads it: an analytic site whose guide distribution has no score function needs neither. With
validation on it is Trace_ELBO's own trace, every density computed. The two paths must give the same value
and the same gradients at the same draws, in float64, on every kind of site: analytic, Monte Carlo
(weighting, no registered KL, late parents, ``analytic=False``), score-function (where the costs read every
density), guide-only (auxiliary, guide factors), model factors, model-only, vectorised particles, number and
tensor scales, site masks, a subsampled plate, a GuideMessenger guide, the over-regularised KL, and the policy
models.
"""

from __future__ import annotations

import functools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from experiments.benchmark_steps import build_case
from inference.ork_elbo import OverRegularisedKL_ELBO
from inference.pathwise_kl_elbo import PathwiseKL_ELBO, no_score_function
from ppl_models.linear_gaussian import LinearGaussianChain

pytestmark = pytest.mark.usefixtures("float64_and_seed")


@pytest.fixture
def validation():
    """Yields a setter for Pyro's validation; restores the setting after the test."""
    from pyro.infer.util import is_validation_enabled

    before = is_validation_enabled()
    yield pyro.enable_validation
    pyro.enable_validation(before)


def _value_and_grads(objective, model, guide, args, leaves, seed=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    loss = objective.differentiable_loss(model, guide, *args)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [g for g in grads if g is not None]


def _both_paths(validation, make_objective, model, guide, args, leaves):
    """(value, grads) with validation on (Pyro's eager densities) and off (only those read)."""
    out = []
    for on in (True, False):
        validation(on)
        out.append(_value_and_grads(make_objective(), model, guide, args, leaves))
    return out


def _assert_same(a, b):
    (va, ga), (vb, gb) = a, b
    assert torch.equal(va, vb), (va, vb)
    assert len(ga) == len(gb) > 0
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ small models
def _chain_model(x, w):
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z_1", dist.Normal(torch.zeros_like(x), 1.0))
        z2 = pyro.sample("z_2", dist.Normal(w[0] * z1, 0.8))
        pyro.sample("x", dist.Normal(z2, 0.5), obs=x)


def _chain_guide(x, w, reparam_z1=True, masked_z2=False):
    with pyro.plate("data", x.shape[0]):
        q1 = dist.Normal(w[1] * x, 0.9)
        z1 = pyro.sample("z_1", q1 if reparam_z1 else q1.has_rsample_(False))
        q2 = dist.Normal(w[2] * z1 + 0.1 * x, 0.6)
        pyro.sample("z_2", q2.mask(x > 0) if masked_z2 else q2)


def _aux_guide(x, w):
    with pyro.plate("data", x.shape[0]):
        u = pyro.sample("u", dist.Normal(w[1] * x, 1.0), infer={"is_auxiliary": True})
        z1 = pyro.sample("z_1", dist.Normal(0.5 * u, 0.9))
        pyro.sample("z_2", dist.Normal(w[2] * z1, 0.6))


def _late_guide(x, w):
    # z_2 first: z_1's model parent-free, but z_2's possible parent z_1 comes late -> Monte Carlo z_2.
    with pyro.plate("data", x.shape[0]):
        z2 = pyro.sample("z_2", dist.Normal(w[1] * x, 0.7))
        pyro.sample("z_1", dist.Normal(w[2] * z2, 0.9))


def _gamma_model(x, w):
    with pyro.plate("data", x.shape[0]):
        s = pyro.sample("z_1", dist.Gamma(2.0, 1.0))
        pyro.sample("x", dist.Normal(0.0, s), obs=x)


def _gamma_guide(x, w):  # LogNormal against Gamma: no registered KL, Monte Carlo
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z_1", dist.LogNormal(w[1] * x, 0.5))


def _missing_guide(x, w):  # no z_2: the model draws it (Trace_ELBO's value, with its warning)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z_1", dist.Normal(w[1] * x, 0.9))


def _factor_model(x, w):
    _chain_model(x, w)
    pyro.factor("penalty", -0.1 * (w ** 2).sum())  # a model factor: an observed site


def _factor_guide(x, w):
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z_1", dist.Normal(w[1] * x, 0.9))
        pyro.sample("z_2", dist.Normal(w[2] * z1 + 0.1 * x, 0.6))
        # guide factors, with and without a reparameterised value
        pyro.factor("guide_term", 0.05 * w[1] * z1, has_rsample=True)
        pyro.factor("guide_score", 0.05 * w[2] * x, has_rsample=False)


def _subsampled_model(x, w):
    with pyro.plate("data", x.shape[0], subsample_size=3, subsample=torch.tensor([0, 2, 3])) as idx:
        z1 = pyro.sample("z_1", dist.Normal(torch.zeros(3), 1.0))
        pyro.sample("x", dist.Normal(w[0] * z1, 0.5), obs=x[idx])


def _subsampled_guide(x, w):
    with pyro.plate("data", x.shape[0], subsample_size=3, subsample=torch.tensor([0, 2, 3])) as idx:
        pyro.sample("z_1", dist.Normal(w[1] * x[idx], 0.9))


_SITE_MASK = torch.tensor([True, False, True, True])
_TENSOR_SCALE = torch.tensor([1.0, 2.0, 0.5, 1.5])

CASES = {
    "analytic": (_chain_model, _chain_guide),
    "score-function": (_chain_model, functools.partial(_chain_guide, reparam_z1=False)),
    "weighting": (_chain_model, functools.partial(_chain_guide, masked_z2=True)),
    "auxiliary": (_chain_model, _aux_guide),
    "late": (_chain_model, _late_guide),
    "unregistered": (_gamma_model, _gamma_guide),
    "model-only": (_chain_model, _missing_guide),
    "scaled": (poutine.scale(_chain_model, scale=2.5), poutine.scale(_chain_guide, scale=2.5)),
    "tensor-scale": (poutine.scale(_chain_model, scale=_TENSOR_SCALE),
                     poutine.scale(_chain_guide, scale=_TENSOR_SCALE)),
    "site-mask": (poutine.mask(_chain_model, mask=_SITE_MASK), poutine.mask(_chain_guide, mask=_SITE_MASK)),
    "factors": (_factor_model, _factor_guide),
    "subsample": (_subsampled_model, _subsampled_guide),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")
@pytest.mark.parametrize(("case", "objective"), [
    *((case, objective) for case in sorted(CASES) for objective in ("pathwise", "vectorised")),
    ("analytic", "ork"),  # the over-regularised KL refuses a site without a closed-form KL
    ("analytic", "analytic-off"),
])
def test_both_paths_give_the_same_value_and_gradients(validation, case, objective):
    make = {"pathwise": PathwiseKL_ELBO,
            "vectorised": lambda: PathwiseKL_ELBO(num_particles=7, vectorize_particles=True,
                                                  max_plate_nesting=1),
            "ork": OverRegularisedKL_ELBO,
            "analytic-off": lambda: PathwiseKL_ELBO(analytic=False)}[objective]
    model, guide = CASES[case]
    x = torch.tensor([0.3, -1.2, 2.0, 0.7])
    w = torch.tensor([0.8, 0.5, 0.6], requires_grad=True)
    _assert_same(*_both_paths(validation, make, model, guide, (x, w), [w]))


def test_a_guide_messenger_takes_pyro_own_trace(validation):
    """A GuideMessenger guide (AutoNormalMessenger) makes its own traces: Trace_ELBO's path either way."""
    from pyro.infer.autoguide import AutoNormalMessenger

    x = torch.tensor([0.3, -1.2, 2.0, 0.7])
    w = torch.tensor([0.8, 0.5, 0.6])

    def model(x):
        _chain_model(x, w)

    guide = AutoNormalMessenger(model)
    out = []
    for on in (True, False):
        validation(on)
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide(x)  # its parameters, created at the first call
        leaves = [p.unconstrained() for p in pyro.get_param_store().values()]
        out.append(_value_and_grads(PathwiseKL_ELBO(), model, guide, (x,), leaves))
    _assert_same(*out)


@pytest.mark.parametrize("name", ["gpsi-add", "lstm-add", "draw-extended-add", "vae"])
def test_both_paths_agree_on_the_policy_models(validation, name):
    case = build_case(name, "quick", 4, torch.device("cpu"), seed=0, dtype=torch.float64)
    m = case.module
    _assert_same(*_both_paths(validation, PathwiseKL_ELBO, m.model, m.guide, case.inputs,
                              list(m.parameters())))


def test_linear_gaussian_value_without_validation_is_the_closed_form_elbo(validation):
    """The lazy path's estimator is unbiased for the exact ELBO of a sequential linear-Gaussian guide."""
    validation(False)
    m = LinearGaussianChain(latent_dim=2, obs_dim=3, num_steps=3, seed=1)
    x = m.sample(4, seed=1)
    params = m.exact_guide_params()
    shifted = type(params)(params.F, params.G, [h + 0.3 for h in params.h], params.L)
    guide = functools.partial(m.guide, params=shifted)
    elbo = PathwiseKL_ELBO(num_particles=20000, vectorize_particles=True, max_plate_nesting=1)
    # The single-particle sd here is below 3 nats, so 5 standard errors of a 20000-particle mean < 0.11.
    assert -elbo.loss(m.model, guide, x) == pytest.approx(m.analytic_elbo(x, shifted).sum().item(), abs=0.11)


def test_analytic_reparameterised_sites_get_no_density(validation):
    validation(False)
    x = torch.tensor([0.3, -1.2])
    w = torch.tensor([0.8, 0.5, 0.6])
    every = PathwiseKL_ELBO(every_density=True)  # Trace_ELBO's trace, for a benchmark: all computed
    model_trace, guide_trace = next(iter(every._get_traces(_chain_model, _chain_guide, (x, w), {})))
    assert all("log_prob" in s for s in model_trace.nodes.values() if s["type"] == "sample")
    assert all("score_parts" in s for s in guide_trace.nodes.values() if s["type"] == "sample")
    torch.testing.assert_close(
        _value_and_grads(every, _chain_model, _chain_guide, (x, w.requires_grad_()), [w]),
        _value_and_grads(PathwiseKL_ELBO(), _chain_model, _chain_guide, (x, w), [w]), rtol=0, atol=0)
    w = w.detach()
    elbo = PathwiseKL_ELBO()
    for guide, computed in ((_chain_guide, {"x"}),
                            # a score function: its cost reads every density
                            (functools.partial(_chain_guide, reparam_z1=False), {"x", "z_1", "z_2"})):
        model_trace, guide_trace = next(iter(elbo._get_traces(_chain_model, guide, (x, w), {})))
        assert not any("log_prob" in s for s in model_trace.nodes.values())
        elbo._particle(model_trace, guide_trace)
        has = {n for n, s in model_trace.nodes.items() if "log_prob" in s}
        assert has == computed
        assert {n for n, s in guide_trace.nodes.items() if "score_parts" in s} == computed - {"x"}


def test_no_score_function_is_decided_without_guessing():
    normal = dist.Normal(torch.zeros(3), 1.0)
    assert no_score_function(normal)
    assert no_score_function(normal.to_event(1).mask(torch.tensor(True)))
    assert no_score_function(normal.expand([2, 3]).mask(torch.tensor([True, False, True])))
    assert not no_score_function(dist.Bernoulli(0.3))
    # has_rsample switched off on the base, under wrappers that take it from their base
    assert not no_score_function(dist.Normal(torch.zeros(3), 1.0).has_rsample_(False).to_event(1).mask(True))
    # a partially reparameterised distribution with its own score_parts is not assumed
    rejector = dist.Rejector(dist.Normal(0.0, 1.0), lambda z: torch.zeros_like(z), torch.tensor(0.0))
    assert rejector.has_rsample and not no_score_function(rejector)


@pytest.mark.parametrize("name", ["gpsi-add", "vae"])
def test_training_on_the_read_densities_is_bit_identical_to_every_density(name):
    """Float32, as training runs: SVI steps with validation off give the same losses and weights whether
    the objective computes only the densities it reads or all of them (Trace_ELBO's trace)."""
    runs = []
    for every in (False, True):
        case = build_case(name, "quick", 8, torch.device("cpu"), seed=0, dtype=torch.float32)
        m = case.module
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        svi = pyro.infer.SVI(m.model, m.guide, pyro.optim.ClippedAdam({"lr": 1e-3}),
                             PathwiseKL_ELBO(every_density=every))
        with pyro.validation_enabled(False):
            losses = [svi.step(*case.inputs) for _ in range(5)]
        runs.append((losses, [p.detach().clone() for p in m.parameters()]))
    (la, pa), (lb, pb) = runs
    assert la == lb
    assert all(torch.equal(a, b) for a, b in zip(pa, pb, strict=True))
