"""Professor forcing's discriminator terms against hand-made answers: the losses of Eqs. 2.1, 2.3 and 2.4, the
gates opening and closing at the stated accuracies, the adversarial gradient reaching the generator through
its behaviour, and the two optimisers never touching each other's networks."""

import copy
import math

import pyro
import pytest
import torch

from inference.professor_forcing import (
    BehaviourDiscriminator,
    ProfessorForcing,
    discriminator_accuracy,
    discriminator_loss,
    gates,
    generator_adversarial_loss,
)
from ppl_models.gru_generator import GRUGenerator


def test_the_losses_are_eqs_2_1_2_3_and_2_4_by_hand():
    tf, fr = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sig = torch.sigmoid
    c_d = -(sig(tf).log().sum() + (1 - sig(fr)).log().sum())
    c_f = -sig(fr).log().sum()
    c_t = -(1 - sig(tf)).log().sum()
    assert float(discriminator_loss(tf, fr)) == pytest.approx(float(c_d))
    assert float(generator_adversarial_loss(tf, fr, False)) == pytest.approx(float(c_f))
    assert float(generator_adversarial_loss(tf, fr, True)) == pytest.approx(float(c_f + c_t))


def test_the_gates_open_and_close_at_the_stated_accuracies():
    # hand-made discriminator outputs: 3 of 4 teacher-forced and 3 of 4 free-running classified right
    tf, fr = torch.tensor([1.0, 2.0, 0.5, -1.0]), torch.tensor([-1.0, -2.0, 0.0, 3.0])
    assert discriminator_accuracy(tf, fr) == 0.75
    assert gates(0.75) == (False, True)  # the generator's adversarial gradient only above 75 %
    assert gates(0.76) == (True, True)
    assert gates(0.99) == (True, True)
    assert gates(0.995) == (True, False)  # D frozen above 99 %
    assert gates(0.6, generator_gate=0.5, freeze_gate=0.55) == (True, False)  # configurable


def test_the_term_follows_its_gates(monkeypatch):
    torch.manual_seed(0)
    gen = GRUGenerator(5, "categorical", hidden=6, vocab=4, embed=3)
    pf = ProfessorForcing(gen, hidden=5, mlp=5)
    x = torch.randint(0, 4, (8, 5))
    calls = []

    def logits(features, accuracy):  # teacher-forced first, then free-running, as generator_loss calls D
        n = features.shape[0]
        right = round(accuracy * n)
        sign = 1.0 if len(calls) % 2 == 0 else -1.0
        calls.append(n)
        return sign * torch.where(torch.arange(n) < right, 5.0, -5.0) + 0 * features.sum()

    for accuracy, adversarial, update in ((0.75, False, True), (0.875, True, True), (1.0, True, False)):
        calls.clear()
        monkeypatch.setattr(pf.module, "forward", lambda f, a=accuracy: logits(f, a))
        term = pf.generator_loss(x)
        assert (term is not None) == adversarial
        monkeypatch.undo()
        before = [p.detach().clone() for p in pf.module.parameters()]
        out = pf.step(x)
        moved = any(not torch.equal(b, p) for b, p in zip(before, pf.module.parameters(), strict=True))
        assert out["accuracy"] == accuracy and moved == update
        assert (out["gate_generator"], out["gate_discriminator"]) == (float(adversarial), float(update))


def test_the_adversarial_gradient_reaches_the_generator_through_its_behaviour():
    torch.manual_seed(1)
    gen = GRUGenerator(7, "bernoulli", hidden=6)
    pf = ProfessorForcing(gen, hidden=5, mlp=5, generator_gate=0.0)  # always on
    term = pf.generator_loss(torch.randint(0, 2, (6, 7)))
    grads = torch.autograd.grad(term, list(gen.parameters()), allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_two_optimisers_never_touch_each_others_networks(tmp_path):
    from inference.train import Trainer

    torch.manual_seed(2)
    gen = GRUGenerator(5, "categorical", hidden=6, vocab=4, embed=3)
    pf = ProfessorForcing(gen, hidden=5, mlp=5, generator_gate=0.0)  # the adversarial term on every step
    d_ids = {id(p) for p in pf.module.parameters()}
    g_ids = {id(p) for p in gen.parameters()}
    assert {id(p) for g in pf.optimizer.param_groups for p in g["params"]} == d_ids and not d_ids & g_ids
    g_before = [p.detach().clone() for p in gen.parameters()]
    d_before = [p.detach().clone() for p in pf.module.parameters()]
    trainer = Trainer(gen.model, gen.guide, gen, pyro.infer.Trace_ELBO(), pyro.optim.Adam({"lr": 1e-2}),
                      train_data=torch.randint(0, 4, (16, 5)), batch_size=8, epochs=1, seed=0, device="cpu",
                      out_dir=tmp_path, progress=False, extras=[pf])
    metrics = trainer.fit()
    # the Pyro optimiser holds the generator's parameters only; D's are stepped by D's Adam only
    store = pyro.get_param_store()
    assert {id(store[name].unconstrained()) for name in store.keys()} == g_ids
    assert all(not torch.equal(b, p) for b, p in zip(g_before, gen.parameters(), strict=True))
    assert any(not torch.equal(b, p) for b, p in zip(d_before, pf.module.parameters(), strict=True))
    assert math.isfinite(metrics[-1]["professor/accuracy"]) and "professor/gate_generator" in metrics[-1]


def test_bad_settings_are_clear_errors():
    gen = GRUGenerator(7, "bernoulli", hidden=4)
    with pytest.raises(ValueError, match="gates must be accuracies"):
        ProfessorForcing(gen, generator_gate=1.5)
    with pytest.raises(ValueError, match="must be >= 1"):
        BehaviourDiscriminator(0)


def test_d_steps_on_c_d_alone_and_leaves_the_generator_untouched():
    torch.manual_seed(3)
    gen = GRUGenerator(6, "bernoulli", hidden=5)
    pf = ProfessorForcing(gen, hidden=4, mlp=4, generator_gate=0.0)
    x = torch.randint(0, 2, (8, 6))
    term = pf.generator_loss(x)
    term.backward()  # C_f's gradients land in D's networks too: D's step must not use them
    last = dict(pf._last)
    reference = copy.deepcopy(pf.module)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-3)
    discriminator_loss(reference(last["tf"]), reference(last["fr"])).backward()
    ref_opt.step()
    g_before = [p.detach().clone() for p in gen.parameters()]
    g_grads = [None if p.grad is None else p.grad.clone() for p in gen.parameters()]
    pf.optimizer.zero_grad(set_to_none=True)  # as the Trainer does before a hook's step
    pf.step(x)
    for p, q in zip(pf.module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)  # the same as an Adam step on C_d alone
    assert all(torch.equal(b, p) for b, p in zip(g_before, gen.parameters(), strict=True))
    assert all(torch.equal(a, p.grad) for a, p in zip(g_grads, gen.parameters(), strict=True))


def test_the_hooks_free_run_does_not_read_the_batch():
    gen = GRUGenerator(6, "bernoulli", hidden=5)
    pf = ProfessorForcing(gen, hidden=4, mlp=4)
    runs = []
    for x in (torch.zeros(4, 6, dtype=torch.long), torch.ones(4, 6, dtype=torch.long)):
        torch.manual_seed(4)
        runs.append(pf.behaviours(x)[1].x)
    assert torch.equal(runs[0], runs[1])
