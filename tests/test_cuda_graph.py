"""The captured training step (inference.cuda_graph) and what it needs: steps that read nothing back to the
host (inference.host_sync). On a CPU the graphs are replaced by a stand-in that records the captured
Python and re-runs it on replay, which checks the step's logic (static inputs, one capture per shape, the
loss checked before the update, the Trainer's wiring); the captures themselves run where CUDA is present.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

import inference.cuda_graph as cuda_graph
from experiments.benchmark_steps import MODELS, build_case
from inference.cuda_graph import GraphedStep, StepNotCapturable
from inference.host_sync import host_syncs
from inference.optim import ClippedAdam
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from inference.train import NonFiniteLossError, Trainer, load_checkpoint

CUDA = torch.cuda.is_available()


class ReplayingGraphs:
    """Stand-in for torch.cuda's graphs: a capture records the function and runs nothing (as a capture runs
    no kernel), a replay runs it again."""

    def __init__(self, device=None) -> None:
        self.captures = 0

    def on_device(self):
        return contextlib.nullcontext()

    def side_stream(self):
        return contextlib.nullcontext()

    def sync_debug(self):
        return contextlib.nullcontext()

    def capture(self, fn, pool=None):
        self.captures += 1
        return SimpleNamespace(replay=fn)


# ------------------------------------------------------------------ steps free of host reads


def _step(case):
    m = case.module

    def step():
        loss = case.objective.differentiable_loss(m.model, m.guide, *case.inputs)
        loss.backward()
        return loss
    return step


@pytest.mark.parametrize("name", MODELS)
def test_benchmarked_training_steps_read_nothing_back(name):
    # The project's step and the benchmark's hand-written floor of it alike: a read-back in the floor only
    # would flatter the ratio on a GPU.
    case = build_case(name, "quick", 4, torch.device("cpu"), 0)
    step = _step(case)

    def handwritten():
        loss = case.handwritten(case.module, *case.inputs)
        loss.backward()
    with pyro.validation_enabled(False):
        step()
        _, found = host_syncs(step)
        _, found_by_hand = host_syncs(handwritten)
    assert [str(f) for f in found] == []
    assert [str(f) for f in found_by_hand] == []


def test_the_detector_finds_reads_back():
    # Pyro's own Trace_ELBO.differentiable_loss takes .item() of the loss and checks it for NaN.
    case = build_case("vae", "quick", 4, torch.device("cpu"), 0)
    m = case.module
    with pyro.validation_enabled(False):
        _, found = host_syncs(Trace_ELBO().differentiable_loss, m.model, m.guide, *case.inputs)
    assert {f.call for f in found} >= {"item", "__bool__"}
    x = torch.tensor([1.0, -1.0])
    _, found = host_syncs(lambda: (x[x > 0], x.tolist(), x.to("cpu"), x.to(device=x.device)))
    assert [f.call for f in found] == ["__getitem__", "tolist", "to"]

    def assign():
        y = x.clone()
        y[y > 0] = 0.0  # one value: a masked fill, no count of the mask's True values
        y[y > 0] = torch.ones(2)[:1].expand(1)  # one value still
        y[y < 5] = torch.zeros(2)  # values for each True entry: their count sets a shape
    _, found = host_syncs(assign)
    assert [f.call for f in found] == ["__setitem__"]


def test_differentiable_loss_equals_the_svi_route(float64_and_seed):
    # PathwiseKL_ELBO's own differentiable_loss (no .item()) against loss_and_grads (Trace_ELBO's route),
    # at the same draws: the same value and gradients.
    case = build_case("gpsi-add", "quick", 5, torch.device("cpu"), 0, dtype=torch.float64)
    m, elbo = case.module, PathwiseKL_ELBO()
    pyro.set_rng_seed(3)
    loss = elbo.differentiable_loss(m.model, m.guide, *case.inputs)
    loss.backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    pyro.set_rng_seed(3)
    value = elbo.loss_and_grads(m.model, m.guide, *case.inputs)
    assert loss.item() == value
    for p, g in zip(m.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ the captured step


def _eager_step(m, elbo, opt, inputs, clip):
    loss = elbo.differentiable_loss(m.model, m.guide, *inputs)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.grad is not None], clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _batches(case, steps):
    # Other rows every step, in two shapes, alternating: each shape gets its own pair of graphs.
    return [tuple(t.roll(i, 0)[: 6 - i % 2] for t in case.inputs) for i in range(steps)]


def _train(name, device, graphed, steps=9, graphs=None):
    """Losses and parameters after ``steps`` steps of ``name``, eager or through a GraphedStep."""
    case = build_case(name, "quick", 6, torch.device(device), 0)
    m, elbo = case.module, PathwiseKL_ELBO()
    opt = ClippedAdam(m.parameters(), lr=1e-2, lrd=0.99, clip_norm=1e12, capturable=True)

    def loss_fn(*inputs):
        return elbo.differentiable_loss(m.model, m.guide, *inputs)
    step = GraphedStep(loss_fn, list(m.parameters()), opt, clip_norm=50.0, warmup=2, _graphs=graphs)
    pyro.set_rng_seed(5)
    losses = []
    with pyro.validation_enabled(False):
        for inputs in _batches(case, steps):
            if graphed:
                losses.append(step.loss(*inputs).clone())
                step.update()
            else:
                losses.append(_eager_step(m, elbo, opt, inputs, 50.0))
    return torch.stack(losses), [p.detach().clone() for p in m.parameters()], step


def test_graphed_step_trains_as_the_eager_step():
    graphs = ReplayingGraphs()
    eager_losses, eager_params, _ = _train("gpsi-add", "cpu", graphed=False)
    losses, params, step = _train("gpsi-add", "cpu", graphed=True, graphs=graphs)
    assert torch.equal(losses, eager_losses)
    for a, b in zip(params, eager_params, strict=True):
        assert torch.equal(a, b)
    assert graphs.captures == 4  # two graphs for each of the two shapes
    assert [shape[0][0] for shape in step.captured_shapes] == [(6, 784), (5, 784)]


def test_warmup_must_be_positive():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedStep(lambda: torch.zeros(()), [], torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1),
                    warmup=0)


# ------------------------------------------------------------------ the Trainer's wiring

N, BATCH, D, Z = 22, 8, 6, 2  # 3 steps per epoch, the last one of 6


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 2 * Z))
        self.dec = nn.Sequential(nn.Linear(Z, 8), nn.Tanh(), nn.Linear(8, D))
        self.calls = 0
        self.poison_at: int | None = None
        self.prior_scale: float | None = None  # a number: copied from the host to the device every step

    def model(self, x):
        pyro.module("toy", self)
        self.calls += 1
        if self.calls == self.poison_at:
            x = x * float("nan")
        with pyro.plate("data", x.shape[0]):
            zeros = x.new_zeros(x.shape[0], Z)
            z = pyro.sample("z_0", dist.Normal(zeros, self.prior_scale or torch.ones_like(zeros)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z), validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("toy", self)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.enc(x).chunk(2, -1)
            pyro.sample("z_0", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


@pytest.fixture
def replaying(monkeypatch):
    """The Trainer's graphs on a CPU: the stand-in, and the CPU allowed."""
    monkeypatch.setattr(cuda_graph, "_CudaGraphs", ReplayingGraphs)
    monkeypatch.setattr(cuda_graph, "capture_supported", lambda device: True)


def _trainer(out, cuda_graph_on, epochs=3, device="cpu", validate=False, optimizer=None, clip_norm=20.0,
             **kwargs):
    pyro.clear_param_store()
    toy = Toy().to(device)
    data = (torch.rand(N, D, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    return Trainer(toy.model, toy.guide, toy, PathwiseKL_ELBO(),
                   # capturable, as the Trainer makes it for capture: both runs take the same arithmetic
                   optimizer or (lambda ps: ClippedAdam(ps, lr=0.05, lrd=0.98, clip_norm=1e12,
                                                        capturable=True)),
                   data, batch_size=BATCH,
                   epochs=epochs, seed=3, device=device, out_dir=out, progress=False, clip_norm=clip_norm,
                   validate=validate, cuda_graph=cuda_graph_on, **kwargs)


@pytest.mark.parametrize("clip_norm", [20.0, 0.05], ids=["clip-idle", "clip-active"])
def test_trainer_with_captured_steps_trains_as_without(tmp_path, replaying, clip_norm):
    # With the clip active on every step, both sum the gradient norm in one order (SVI mode's): the
    # param-store names' order (Toy's dec before enc), not the module's.
    eager = _trainer(tmp_path / "eager", False, epochs=5, clip_norm=clip_norm)  # seeds the global RNGs
    a = eager.fit()
    graphed = _trainer(tmp_path / "graphed", True, epochs=5, clip_norm=clip_norm)
    b = graphed.fit()
    assert [m["train_loss"] for m in a] == [m["train_loss"] for m in b]
    after = graphed.module.state_dict()
    for k, v in eager.module.state_dict().items():
        assert torch.equal(v, after[k]), k
    assert eager.graphed_step is None
    # The full minibatch and the epoch's last (6 points), each captured after three warm-up steps.
    assert [shape[0][0] for shape in graphed.graphed_step.captured_shapes] == [(8, D), (6, D)]


def test_trainer_stops_on_a_nan_before_the_captured_update(tmp_path, replaying):
    before = {}

    def snapshot(x, generator):  # called right before each step
        before.update({k: v.clone() for k, v in trainer.module.state_dict().items()})
        return x

    trainer = _trainer(tmp_path, True, epochs=4, transform=snapshot)
    bad = 3 * 3 + 2  # the second step of epoch 4: a replay of the full minibatch's graphs
    trainer.module.poison_at = bad  # the model runs once per step, replays included
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    assert (info.value.epoch, info.value.step) == (4, bad)
    assert trainer.graphed_step.captured_shapes and trainer.step == bad - 1
    for key, value in trainer.module.state_dict().items():  # the update was not replayed
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("change, needs", [
    (dict(), "a CUDA device"),
    (dict(validate=True), "validation off"),
    (dict(compile=True), "compile off"),
])
def test_trainer_says_what_capture_needs(tmp_path, change, needs):
    with pytest.raises(ValueError, match=f"cuda_graph=True needs .*{needs}"):
        _trainer(tmp_path, True, **change)


def test_trainer_refuses_pyro_optimisers_for_capture(tmp_path, replaying):
    toy = Toy()
    with pytest.raises(ValueError, match="differentiable-loss mode"):
        Trainer(toy.model, toy.guide, toy, PathwiseKL_ELBO(), pyro.optim.Adam({"lr": 0.1}), torch.zeros(4, D),
                batch_size=2, epochs=1, seed=0, device="cpu", out_dir=tmp_path, validate=False,
                cuda_graph=True)


# ------------------------------------------------------------------ real captures (CUDA only)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", ["gpsi-add", "lstm-add", "draw-extended-add", "vae"])
def test_cuda_graph_replays_equal_eager_steps(name):
    # The same kernels on the same Philox counters: replays draw the eager steps' noise.
    eager_losses, eager_params, _ = _train(name, "cuda", graphed=False)
    losses, params, step = _train(name, "cuda", graphed=True)
    assert len(step.captured_shapes) == 2
    torch.testing.assert_close(losses, eager_losses)
    for a, b in zip(params, eager_params, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_cuda_graph_trainer_resumes_exactly(tmp_path):
    full = _trainer(tmp_path / "full", True, epochs=5, device="cuda")
    a = full.fit()
    _trainer(tmp_path / "split", True, epochs=2, device="cuda").fit()
    b = _trainer(tmp_path / "split", True, epochs=5, device="cuda").fit(resume=True)
    assert [m["train_loss"] for m in a] == [m["train_loss"] for m in b]
    resumed = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["module"]
    for k, v in full.module.state_dict().items():
        assert torch.equal(v, resumed[k]), k


def test_a_step_a_graph_cannot_hold_is_refused_by_name(tmp_path, replaying):
    # A number as a distribution's parameter is copied from the host every step; Pyro's validation reads
    # values back. The first warm-up step finds either before any capture.
    trainer = _trainer(tmp_path / "number", True)
    trainer.module.prior_scale = 1.0
    with pytest.raises(StepNotCapturable, match=r"copies host data to the device.*tensor at"):
        trainer.fit()
    assert trainer.graphed_step.captured_shapes == []
    case = build_case("vae", "quick", 4, torch.device("cpu"), 0)
    m = case.module
    step = GraphedStep(lambda x: PathwiseKL_ELBO().differentiable_loss(m.model, m.guide, x),
                       list(m.parameters()), ClippedAdam(m.parameters(), capturable=True),
                       _graphs=ReplayingGraphs())
    with pyro.validation_enabled(True), pytest.raises(StepNotCapturable, match="__bool__"):
        step.loss(*case.inputs)


def test_update_needs_a_loss_first():
    case = build_case("vae", "quick", 4, torch.device("cpu"), 0)
    m = case.module
    step = GraphedStep(lambda x: PathwiseKL_ELBO().differentiable_loss(m.model, m.guide, x),
                       list(m.parameters()), ClippedAdam(m.parameters(), capturable=True),
                       _graphs=ReplayingGraphs())
    with pytest.raises(RuntimeError, match="needs a loss"):
        step.update()
    with pyro.validation_enabled(False):
        step.loss(*case.inputs)
    step.update()
    with pytest.raises(RuntimeError, match="one update per loss"):
        step.update()


def test_no_gradient_is_left_behind_after_captured_training(tmp_path, replaying):
    # The graphs own the gradients' memory; a fine-tuning after training must not clip or add into it.
    trainer = _trainer(tmp_path, True, epochs=5)
    trainer.fit()
    assert trainer.graphed_step.captured_shapes
    assert all(p.grad is None for p in trainer.module.parameters())


class ReadingSGD(torch.optim.SGD):
    """An optimiser whose step reads a value back, as one with host-side bookkeeping would."""

    def step(self, closure=None):
        float(self.param_groups[0]["params"][0].grad.sum())
        return super().step(closure)


def test_an_update_a_graph_cannot_hold_is_refused_by_name(tmp_path, replaying):
    # The Trainer's first step (eager, outside the GraphedStep) creates the optimiser's state: the check of
    # the update must not hang on that state being empty.
    trainer = _trainer(tmp_path, True, optimizer=lambda ps: ReadingSGD(ps, lr=0.01, momentum=0.9))
    with pytest.raises(StepNotCapturable, match="clipping and the optimiser's step.*__float__ at"):
        trainer.fit()
    assert trainer.graphed_step.captured_shapes == []
    assert all(p.grad is None for p in trainer.module.parameters())  # nothing of the refused step is left
