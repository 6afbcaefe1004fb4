"""The model interface and registry (ppl_models/base.py): every registered model provides what the runner,
the scorer and the guide fine-tuner rely on, with no per-model branch."""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
import pytest
import torch

from ppl_models import ModelGuidePair, build_model, model_names
from ppl_models.base import model_spec, register_model
from ppl_models.masks import make_mask_process

D = 64  # 8x8 images
#: models whose guide has no parameters of its own (a fixed process, or the model's operator detached)
FIXED_GUIDES = {"diffusion-bernoulli", "diffusion-gaussian", "walkback", "gru-pixels", "gru-chars"}

SIZES = {
    "vae": {"z_dim": 3, "hidden": (16,)},
    "gsn-chain": {"z_dim": 3, "hidden": (16,), "num_steps": 3},
    "diffusion-bernoulli": {"num_steps": 3, "hidden": (16,)},
    "diffusion-gaussian": {"num_steps": 3, "channels": 8, "groups": 4, "embed_dim": 8},
    "miwae": {"z_dim": 3, "hidden": (16,)},
    "walkback": {"hidden": (16,), "t_max": 4.0, "max_extra": 0},
    "gru-pixels": {"hidden": 8},
    "conv-vae": {"z_dim": 3, "channels": (4, 8)},
    "gcrl": {"steps": 3, "actions": 4, "channels": 8, "mult": (1, 2), "groups": 4, "embed_dim": 8,
             "select_channels": 4},
    "gru-chars": {"hidden": 8, "vocab": 2, "embed": 3},
    "gpsi-add": {"z_dim": 4, "hidden": (16,), "num_steps": 3},
    "gpsi-jump": {"z_dim": 4, "hidden": (16,), "num_steps": 3},
    "lstm-add": {"z_dim": 4, "z0_dim": 3, "lstm_dim": 12, "mix_hidden": 10, "num_steps": 3},
    "lstm-jump": {"z_dim": 4, "z0_dim": 3, "lstm_dim": 12, "mix_hidden": 10, "num_steps": 3},
    "draw-open-loop": {"z_dim": 4, "z0_dim": 3, "lstm_dim": 12, "mix_hidden": 10, "num_steps": 3},
    "draw-extended-add": {"z_dim": 4, "z0_dim": 3, "lstm_dim": 12, "mix_hidden": 10, "num_steps": 3},
    "draw-extended-jump": {"z_dim": 4, "z0_dim": 3, "lstm_dim": 12, "mix_hidden": 10, "num_steps": 3},
}


def _data(name: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, D, generator=g).bernoulli(generator=g)
    if model_spec(name).kind == "imputer":
        return x, make_mask_process("mcar-50", (8, 8)).sample(x, generator=g)
    return (x,)


def test_every_registered_model_is_sized_here():
    assert sorted(SIZES) == model_names()
    assert set(model_names("imputer")) | set(model_names("generator")) == set(model_names())


@pytest.mark.parametrize("name", sorted(SIZES))
def test_registered_model_keeps_the_interface(name):
    pyro.clear_param_store()
    torch.manual_seed(0)
    module = build_model(name, x_dim=D, **SIZES[name])
    assert isinstance(module, ModelGuidePair)
    data = _data(name)

    # latent_sites: the model's latent sites, in the model's order; the guide samples the same ones.
    guide_trace = poutine.trace(module.guide).get_trace(*data)
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(*data)
    latent = tuple(n for n, s in model_trace.nodes.items()
                   if s["type"] == "sample" and not s["is_observed"] and n != "data")
    assert module.latent_sites == latent
    assert {n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and n != "data"} == set(latent)

    # param_prefix: the name pyro.module registers the module's parameters under.
    names = list(pyro.get_param_store().keys())
    assert names and all(n.startswith(f"{module.param_prefix}$$$") for n in names)

    # guide_parameters: φ, a non-empty part of the parameters that p never uses (zero gradient of the
    # model's log joint along a fixed guide path); model_parameters is the rest.
    phi = module.guide_parameters()
    ids = {id(p) for p in module.parameters()}
    # A fixed guide (the diffusion's noising process) has no φ; every other guide has some.
    assert (not phi) if name in FIXED_GUIDES else phi
    assert all(id(p) in ids for p in phi)
    assert len(phi) + len(module.model_parameters()) == len(list(module.parameters()))
    fixed = poutine.trace(module.guide).get_trace(*data)
    for site in fixed.nodes.values():
        if site["type"] == "sample":
            site["value"] = site["value"].detach()
    log_joint = poutine.trace(poutine.replay(module.model, trace=fixed)).get_trace(*data).log_prob_sum()
    if phi:
        grads = torch.autograd.grad(log_joint, phi, allow_unused=True, retain_graph=True)
        assert all(g is None or not g.abs().sum() for g in grads)
    # ... and the other way: every parameter of θ is one p uses (a non-zero gradient of that log joint),
    # so a guide-only fine-tune leaves nothing that only q uses untrained.
    theta = module.model_parameters()
    grads = torch.autograd.grad(log_joint, theta, allow_unused=True)
    unused = [n for n, p in module.named_parameters() for t, g in zip(theta, grads, strict=True)
              if p is t and (g is None or not g.abs().sum())]
    assert not unused, f"in model_parameters() but not used by the model: {unused}"

    # sample: draws of p in data space without data.
    samples = module.sample(4)
    assert samples.shape == (4, D) and samples.min() >= 0 and samples.max() <= 1


def test_registry_errors_name_what_is_allowed():
    with pytest.raises(ValueError, match=r"unknown model 'nope'; registered models: \[.*'vae'"):
        build_model("nope")
    with pytest.raises(ValueError, match=r"model 'gpsi-add' fixes \['update'\]"):
        build_model("gpsi-add", x_dim=D, update="jump")
    with pytest.raises(ValueError, match="kind must be one of"):
        register_model("x", ModelGuidePair, kind="sampler", about="")
    with pytest.raises(TypeError, match="not a ModelGuidePair subclass"):
        register_model("x", torch.nn.Linear, kind="generator", about="")
