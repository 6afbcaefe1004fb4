"""Tests for inference/train.py: exact resume, NaN handling, atomic checkpoints, hooks, metrics."""

import json
import os
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn
from torch.distributions import constraints

import inference.checkpoint as checkpoint_mod
from inference.train import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    ExtraTerm,
    NonFiniteLossError,
    Trainer,
    load_checkpoint,
    save_checkpoint,
)

D, Z, H = 8, 2, 16
N, BATCH = 40, 16  # 3 steps per epoch, the last one partial (8 points)
STEPS_PER_EPOCH = 3

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class ToyVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(D, H)
        self.enc_loc = nn.Linear(H, Z)
        self.enc_scale = nn.Linear(H, Z)
        self.dec = nn.Sequential(nn.Linear(Z, H), nn.Tanh(), nn.Linear(H, D))


def make_vae(init_seed=0):
    torch.manual_seed(init_seed)
    return ToyVAE()


def make_model_guide(vae, extra_param=False, poison_at=None, poison="nan"):
    """A Bernoulli VAE; ``poison_at=k`` makes the loss of the k-th model call non-finite."""
    calls = [0]

    def model(x):
        pyro.module("vae", vae)
        calls[0] += 1
        if calls[0] == poison_at:
            if poison == "nan":
                x = x * float("nan")
            else:
                pyro.factor("poison", torch.tensor(float("-inf"), device=x.device))
        with pyro.plate("data", x.shape[0]):
            zeros = x.new_zeros(x.shape[0], Z)
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
            logits = vae.dec(z)
            if extra_param:
                # A parameter outside the module: exercises the param-store part of checkpoints.
                temperature = pyro.param("temperature", lambda: x.new_ones(()), constraints.positive)
                logits = logits * temperature
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=x)

    def guide(x):
        pyro.module("vae", vae)
        with pyro.plate("data", x.shape[0]):
            h = torch.tanh(vae.enc(x))
            loc, scale = vae.enc_loc(h), nn.functional.softplus(vae.enc_scale(h)) + 1e-3
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide


def binarize(x, generator):
    # Dynamic binarisation: consumes the trainer's generator, so its state must be restored on resume.
    return torch.bernoulli(x, generator=generator)


def make_data():
    g = torch.Generator().manual_seed(1234)
    return torch.rand(N, D, generator=g)


def make_optimizer(kind):
    if kind == "adam":
        return pyro.optim.Adam({"lr": 0.05})
    if kind == "clipped_adam":
        return pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99, "clip_norm": 5.0})
    if kind == "diff":
        return lambda params: torch.optim.Adam(params, lr=0.05)
    raise ValueError(kind)


class Discriminator(ExtraTerm):
    """Logistic-regression critic (data vs. decoded noise) with its own Adam; GAN-like test hook."""

    name = "disc"

    def __init__(self, vae, weight=0.01):
        torch.manual_seed(99)
        self.vae = vae
        self.module = nn.Linear(D, 1)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=0.05)
        self.weight = weight

    def _fake(self, n, device):
        return torch.sigmoid(self.vae.dec(torch.randn(n, Z, device=device)))

    def step(self, batch):
        fake = self._fake(batch.shape[0], batch.device).detach()
        logits_real, logits_fake = self.module(batch), self.module(fake)
        loss = nn.functional.softplus(-logits_real).mean() + nn.functional.softplus(logits_fake).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "real_score": torch.sigmoid(logits_real).mean()}


class AdversarialDiscriminator(Discriminator):
    def generator_loss(self, batch):
        fake = self._fake(batch.shape[0], batch.device)
        return self.weight * nn.functional.softplus(-self.module(fake)).sum()


def build(
    out_dir,
    optim_kind,
    epochs,
    init_seed=0,
    extra_param=None,
    device="cpu",
    hook=None,
    transform=binarize,
    evaluate=None,
    **kwargs,
):
    pyro.clear_param_store()
    if extra_param is None:
        extra_param = optim_kind != "diff"
    vae = make_vae(init_seed)
    model, guide = make_model_guide(vae, extra_param=extra_param, **kwargs.pop("poison", {}))
    extras = []
    if hook == "adversarial":
        extras = [AdversarialDiscriminator(vae)]
    elif hook == "plain":
        extras = [Discriminator(vae)]  # no generator_loss
    trainer = Trainer(
        model,
        guide,
        vae,
        Trace_ELBO(),
        make_optimizer(optim_kind),
        make_data(),  # on the CPU: the trainer moves each minibatch to the device
        batch_size=BATCH,
        epochs=epochs,
        seed=7,
        device=device,
        out_dir=out_dir,
        transform=transform,
        evaluate=evaluate,
        extras=extras,
        progress=False,
        **kwargs,
    )
    return trainer


def losses(metrics, key="train_loss"):
    return [m[key] for m in metrics]


def assert_states_equal(a, b, path="state"):
    """Recursive exact equality of (nested) state dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu()), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_states_equal(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_states_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def read_metrics(out_dir):
    lines = (out_dir / METRICS_NAME).read_text().splitlines()
    return [json.loads(line) for line in lines]


def strip_seconds(metrics):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]


# ---------------------------------------------------------------------- resume


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "optim_kind, clip_norm",
    [("adam", None), ("clipped_adam", 10.0), ("diff", None), ("diff", 10.0)],
)
def test_resume_is_bit_identical(tmp_path, optim_kind, clip_norm, device):
    full = build(tmp_path / "full", optim_kind, epochs=3, clip_norm=clip_norm, device=device)
    full_metrics = full.fit()
    full_params = {k: v.clone() for k, v in full.module.state_dict().items()}
    full_store = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    full_optim = full.pyro_optim.get_state() if full.pyro_optim else full.optimizer.state_dict()

    first = build(tmp_path / "split", optim_kind, epochs=1, clip_norm=clip_norm, device=device)
    assert len(first.fit()) == 1
    # Different initial weights: everything must come from the checkpoint.
    second = build(tmp_path / "split", optim_kind, epochs=3, init_seed=1, clip_norm=clip_norm, device=device)
    resumed_metrics = second.fit(resume=True)

    assert losses(resumed_metrics) == losses(full_metrics)
    for key, value in second.module.state_dict().items():
        assert torch.equal(value, full_params[key]), key
    store = dict(pyro.get_param_store().items())
    assert store.keys() == full_store.keys()
    if optim_kind != "diff":
        assert "temperature" in store
    for key, value in store.items():
        assert torch.equal(value.detach(), full_store[key]), key
    # Adam moments (and ClippedAdam's decayed lr) were restored, not re-initialised.
    optim_state = second.pyro_optim.get_state() if second.pyro_optim else second.optimizer.state_dict()
    assert_states_equal(optim_state, full_optim)
    assert strip_seconds(read_metrics(tmp_path / "split")) == strip_seconds(full_metrics)


def test_pyro_optim_set_state_restores_adam_moments(tmp_path):
    """PyroOptim.set_state is lazy: check the waiting state really reaches the new per-param Adams."""
    first = build(tmp_path, "adam", epochs=1)
    first.fit()
    saved = load_checkpoint(tmp_path / CHECKPOINT_NAME)["optimizer"]
    assert saved and all(s["state"][0]["step"] == STEPS_PER_EPOCH for s in saved.values())

    second = build(tmp_path, "adam", epochs=1, init_seed=1)
    second.fit(resume=True)  # nothing left to train: the state is still waiting to be consumed
    optim = second.pyro_optim
    assert optim.get_state() == {}
    # One step consumes it: each new per-parameter Adam starts from the saved moments.
    with pyro.poutine.trace(param_only=True) as capture:
        second.loss.loss_and_grads(second.model, second.guide, binarize(make_data(), second.generator))
    params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
    optim(params)
    restored = optim.get_state()
    assert restored.keys() == saved.keys()
    for name, state in restored.items():
        assert state["state"][0]["step"] == STEPS_PER_EPOCH + 1, name
        exp_avg_sq = state["state"][0]["exp_avg_sq"]
        assert not torch.equal(exp_avg_sq, torch.zeros_like(exp_avg_sq)), name


def test_resume_from_mid_epoch_checkpoint_with_hook(tmp_path):
    full = build(tmp_path / "full", "diff", epochs=3, hook="adversarial", checkpoint_every_steps=2)
    full_metrics = full.fit()
    full_hook = full.extras[0].state_dict()

    class Interrupt(Exception):
        pass

    calls = [0]

    def interrupting_binarize_mid(x, g):
        calls[0] += 1
        if calls[0] == 5:  # step 5: inside epoch 2; last checkpoint at step 4 (mid-epoch)
            raise Interrupt
        return binarize(x, g)

    first = build(
        tmp_path / "split", "diff", epochs=3, hook="adversarial", checkpoint_every_steps=2,
        transform=interrupting_binarize_mid,
    )
    with pytest.raises(Interrupt):
        first.fit()
    ckpt = load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)
    assert ckpt["step"] == 4 and ckpt["epoch"] == 1 and ckpt["epoch_state"]["batch"] == 1
    assert len(read_metrics(tmp_path / "split")) == 1

    second = build(
        tmp_path / "split", "diff", epochs=3, init_seed=1, hook="adversarial", checkpoint_every_steps=2
    )
    resumed = second.fit(resume=True)
    assert strip_seconds(resumed) == strip_seconds(full_metrics)
    assert "disc/loss" in resumed[0] and "disc/generator_loss" in resumed[0]
    for key, value in second.module.state_dict().items():
        assert torch.equal(value, full.module.state_dict()[key]), key
    assert_states_equal(second.extras[0].state_dict(), full_hook)
    assert strip_seconds(read_metrics(tmp_path / "split")) == strip_seconds(full_metrics)


@pytest.mark.parametrize("optim_kind, hook",
                         [("diff", "adversarial"), ("adam", "plain"), ("adam", "adversarial")])
def test_extra_term_is_stepped_logged_and_resumed(tmp_path, optim_kind, hook):
    full = build(tmp_path / "full", optim_kind, epochs=2, hook=hook)
    hook_before = {k: v.clone() for k, v in full.extras[0].module.state_dict().items()}
    full_metrics = full.fit()
    hook_after = full.extras[0].state_dict()
    assert any(not torch.equal(hook_after["module"][k], v) for k, v in hook_before.items())
    assert hook_after["optimizer"]["state"][0]["step"] == 2 * STEPS_PER_EPOCH

    logged = read_metrics(tmp_path / "full")
    for m in logged:
        assert {"disc/loss", "disc/real_score"} <= m.keys()
        assert ("disc/generator_loss" in m) == (hook == "adversarial")

    build(tmp_path / "split", optim_kind, epochs=1, hook=hook).fit()
    second = build(tmp_path / "split", optim_kind, epochs=2, init_seed=1, hook=hook)
    resumed = second.fit(resume=True)
    assert strip_seconds(resumed) == strip_seconds(full_metrics)
    assert_states_equal(second.extras[0].state_dict(), hook_after)


@pytest.mark.parametrize("optim_kind", ["adam", "diff"])
def test_hook_optimiser_never_touches_the_main_parameters_and_its_generator_term_does(tmp_path, optim_kind):
    """A real second loss (a logistic critic of data vs. decoded noise, trained by its own Adam) in both
    training modes: every hook step changes the critic and leaves every main parameter bit-identical; the
    main optimiser never holds a critic parameter; and the hook's generator term does reach the main
    parameters (the run differs from one whose generator term has weight 0, everything else equal)."""
    trainer = build(tmp_path / "weighted", optim_kind, epochs=1, hook="adversarial")
    hook = trainer.extras[0]
    hook.weight = 1.0
    unchanged_main, changed_hook = [], []
    original_step = hook.step

    def watched_step(batch):
        main_before = [p.detach().clone() for p in trainer.module.parameters()]
        hook_before = [p.detach().clone() for p in hook.module.parameters()]
        out = original_step(batch)
        unchanged_main.append(all(torch.equal(a, p) for a, p in zip(main_before, trainer.module.parameters(),
                                                                     strict=True)))
        changed_hook.append(any(not torch.equal(a, p) for a, p in zip(hook_before, hook.module.parameters(),
                                                                       strict=True)))
        return out

    hook.step = watched_step
    trainer.fit()
    assert len(unchanged_main) == STEPS_PER_EPOCH and all(unchanged_main) and all(changed_hook)
    hook_ids = {id(p) for p in hook.module.parameters()}
    if optim_kind == "diff":
        held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    else:
        held = {id(p.unconstrained()) for p in pyro.get_param_store().values()}
    assert held and not (held & hook_ids)

    silent = build(tmp_path / "silent", optim_kind, epochs=1, hook="adversarial")
    silent.extras[0].weight = 0.0
    silent.fit()
    assert any(not torch.equal(a, b) for a, b in zip(trainer.module.parameters(), silent.module.parameters(),
                                                     strict=True))


def test_hook_optimiser_over_main_parameters_is_rejected(tmp_path):
    class Greedy(Discriminator):
        def __init__(self, vae):
            super().__init__(vae)
            self.optimizer = torch.optim.Adam([*self.module.parameters(), *vae.parameters()], lr=0.05)

    vae = make_vae(0)
    model, guide = make_model_guide(vae, extra_param=False)
    with pytest.raises(ValueError, match=r"extras\[0\].optimizer holds parameters"):
        Trainer(model, guide, vae, Trace_ELBO(), make_optimizer("diff"), make_data(), batch_size=BATCH,
                epochs=1, seed=0, device="cpu", out_dir=tmp_path, extras=[Greedy(vae)], progress=False)


# ---------------------------------------------------------------------- NaN / inf


@pytest.mark.parametrize("optim_kind", ["clipped_adam", "diff"])
def test_nan_loss_stops_with_last_good_state(tmp_path, optim_kind):
    snapshots = {}

    def snapshot_binarize(x, g):
        # Called right before each step: records the parameters the step starts from.
        snapshots["before_step"] = {k: v.clone() for k, v in trainer.module.state_dict().items()}
        return binarize(x, g)

    def evaluate(epoch):
        snapshots[f"epoch{epoch}"] = {k: v.clone() for k, v in trainer.module.state_dict().items()}
        return {"snap": 1.0}

    bad_step = STEPS_PER_EPOCH + 2  # inside epoch 2
    trainer = build(
        tmp_path, optim_kind, epochs=3, transform=snapshot_binarize, evaluate=evaluate,
        poison={"poison_at": bad_step},
    )
    with pytest.warns(UserWarning), pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    err = info.value
    path = tmp_path / CHECKPOINT_NAME
    assert isinstance(err, RuntimeError)
    assert (err.epoch, err.step) == (2, bad_step) and err.value != err.value
    assert err.checkpoint_path == path
    message = str(err)
    assert "epoch 2" in message and f"step {bad_step}" in message and "nan" in message
    assert f"last good checkpoint at {path} was kept" in message

    # In memory: the parameters of the last good step, untouched by the bad one.
    for key, value in trainer.module.state_dict().items():
        assert torch.equal(value, snapshots["before_step"][key]), key
    assert trainer.step == bad_step - 1
    # On disk: the last good epoch's checkpoint and metrics.
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and ckpt["step"] == STEPS_PER_EPOCH
    assert_states_equal(ckpt["module"], snapshots["epoch1"])
    assert len(read_metrics(tmp_path)) == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    pickled = pickle.loads(pickle.dumps(err))
    assert isinstance(pickled, NonFiniteLossError) and str(pickled) == message


@pytest.mark.parametrize("optim_kind", ["adam", "diff"])
def test_inf_loss_before_first_checkpoint(tmp_path, optim_kind):
    trainer = build(tmp_path, optim_kind, epochs=2, poison={"poison_at": 2, "poison": "inf"})
    # Trace_ELBO.differentiable_loss turns an infinite loss into inf + (inf - inf) = nan.
    expected = r"(inf|nan) at epoch 1, step 2.*no checkpoint had been written yet"
    with pytest.raises(NonFiniteLossError, match=expected):
        trainer.fit()
    assert not (tmp_path / CHECKPOINT_NAME).exists()


# ---------------------------------------------------------------------- atomic checkpoints


def _partial_save(obj, f, *args, **kwargs):
    f.write(b"PARTIAL")
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("failure", ["torch.save", "os.replace"])
def test_save_checkpoint_is_atomic(tmp_path, monkeypatch, failure):
    path = tmp_path / "ck.pt"
    save_checkpoint({"a": torch.arange(3), "b": "good"}, path)
    if failure == "torch.save":
        monkeypatch.setattr(torch, "save", _partial_save)
    else:
        def failing_replace(src, dst):
            raise OSError("replace failed (simulated)")

        monkeypatch.setattr(checkpoint_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint({"a": torch.arange(5), "b": "bad"}, path)
    monkeypatch.undo()
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["a"], torch.arange(3)) and loaded["b"] == "good"
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_failed_checkpoint_write_keeps_previous_and_resume_works(tmp_path, monkeypatch):
    full_metrics = build(tmp_path / "full", "diff", epochs=2).fit()

    real_save = torch.save
    calls = [0]

    def flaky_save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # the end-of-epoch-2 checkpoint
            return _partial_save(obj, f)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="simulated"):
        build(tmp_path / "split", "diff", epochs=2).fit()
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "split")) == [CHECKPOINT_NAME, METRICS_NAME]
    assert load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)["epoch"] == 1
    resumed = build(tmp_path / "split", "diff", epochs=2, init_seed=1).fit(resume=True)
    assert losses(resumed) == losses(full_metrics)


# ---------------------------------------------------------------------- metrics and errors


def test_metrics_jsonl_one_line_per_epoch(tmp_path):
    def evaluate(epoch):
        return {"valid_loss": torch.tensor(float(epoch))}

    metrics = build(tmp_path, "diff", epochs=3, evaluate=evaluate).fit()
    logged = read_metrics(tmp_path)
    assert len(logged) == 3 and logged == metrics
    for epoch, m in enumerate(logged, start=1):
        assert m["epoch"] == epoch and m["step"] == epoch * STEPS_PER_EPOCH
        assert m["valid_loss"] == float(epoch)
        assert isinstance(m["train_loss"], float) and m["seconds"] >= 0
    # A fresh run in the same directory starts a new metrics file.
    build(tmp_path, "diff", epochs=1).fit()
    assert len(read_metrics(tmp_path)) == 1


def test_train_loss_is_per_data_point_epoch_average(tmp_path):
    batch_losses = []

    class RecordingELBO(Trace_ELBO):
        def differentiable_loss(self, model, guide, *args, **kwargs):
            loss = super().differentiable_loss(model, guide, *args, **kwargs)
            batch_losses.append(loss.item())
            return loss

    trainer = build(tmp_path, "diff", epochs=1)
    trainer.loss = RecordingELBO()
    (m,) = trainer.fit()
    assert len(batch_losses) == STEPS_PER_EPOCH
    assert m["train_loss"] == pytest.approx(sum(batch_losses) / N, rel=1e-12)


def test_resume_without_checkpoint_errors(tmp_path):
    trainer = build(tmp_path, "adam", epochs=1)
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*" + CHECKPOINT_NAME):
        trainer.fit(resume=True)


def test_resume_with_different_batch_size_errors(tmp_path):
    build(tmp_path, "diff", epochs=1).fit()
    pyro.clear_param_store()
    vae = make_vae()
    model, guide = make_model_guide(vae)
    trainer = Trainer(
        model, guide, vae, Trace_ELBO(), make_optimizer("diff"), make_data(), batch_size=8, epochs=2,
        seed=7, device="cpu", out_dir=tmp_path, progress=False,
    )
    with pytest.raises(ValueError, match="batch_size=16"):
        trainer.fit(resume=True)


@pytest.mark.parametrize("device", [f"cuda:{torch.cuda.device_count()}", "tpu", "not a device"])
def test_bad_device_errors(tmp_path, device):
    with pytest.raises(ValueError, match=r"available devices: \['cpu'"):
        build(tmp_path, "diff", epochs=1, device=device)


def test_cuda_unavailable_message(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="CUDA is not available; available devices: \\['cpu'\\]"):
        build(tmp_path, "diff", epochs=1, device="cuda")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"batch_size": 2.0}, TypeError, "batch_size must be an int"),
        ({"epochs": -1}, ValueError, "epochs must be >= 0"),
        ({"clip_norm": 0.0}, ValueError, "clip_norm"),
        ({"checkpoint_every_steps": 0}, ValueError, "checkpoint_every_steps"),
        ({"train_data": torch.zeros(0, D)}, ValueError, "empty"),
        ({"train_data": (torch.zeros(4, D), torch.zeros(5))}, ValueError, "same size"),
        ({"optimizer": "adam"}, TypeError, "PyroOptim"),
    ],
)
def test_argument_validation(tmp_path, kwargs, error, match):
    vae = make_vae()
    model, guide = make_model_guide(vae)
    args = dict(
        model=model, guide=guide, module=vae, loss=Trace_ELBO(), optimizer=make_optimizer("diff"),
        train_data=make_data(), batch_size=4, epochs=1, seed=0, device="cpu", out_dir=tmp_path,
    )
    args.update(kwargs)
    with pytest.raises(error, match=match):
        Trainer(**args)


def test_optimizer_instance_and_uncreatable_out_dir_rejected(tmp_path):
    vae = make_vae()
    model, guide = make_model_guide(vae)
    common = dict(train_data=make_data(), batch_size=4, epochs=1, seed=0, device="cpu")
    with pytest.raises(TypeError, match="factory"):
        adam = torch.optim.Adam(vae.parameters())
        Trainer(model, guide, vae, Trace_ELBO(), adam, out_dir=tmp_path, **common)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot create out_dir"):
        Trainer(model, guide, vae, Trace_ELBO(), make_optimizer("diff"), out_dir=blocker / "sub", **common)


def test_diff_mode_rejects_params_outside_module(tmp_path):
    trainer = build(tmp_path, "diff", epochs=1, extra_param=True)
    with pytest.raises(ValueError, match="temperature"):
        trainer.fit()


def test_fit_twice_errors(tmp_path):
    trainer = build(tmp_path, "diff", epochs=0)
    assert trainer.fit() == []
    with pytest.raises(RuntimeError, match="once"):
        trainer.fit()


def test_tuple_data_is_splatted(tmp_path):
    seen = []

    vae = make_vae()
    model, guide = make_model_guide(vae)

    def model2(x, y):
        seen.append((x.shape, y.shape))
        model(x)

    def guide2(x, y):
        guide(x)

    pyro.clear_param_store()
    data = make_data()
    labels = torch.arange(N)
    trainer = Trainer(
        model2, guide2, vae, Trace_ELBO(), make_optimizer("adam"), (data, labels), batch_size=BATCH, epochs=1,
        seed=0, device="cpu", out_dir=tmp_path, progress=False,
        transform=lambda batch, g: (binarize(batch[0], g), batch[1]),
    )
    trainer.fit()
    assert seen == [((16, D), (16,)), ((16, D), (16,)), ((8, D), (8,))]


def test_reused_pyro_optim_starts_fresh(tmp_path):
    """PyroOptim keys its Adams by Parameter object: reusing it with the same module must not leak moments."""
    optim = make_optimizer("adam")
    pyro.clear_param_store()
    vae = make_vae()
    init = {k: v.clone() for k, v in vae.state_dict().items()}
    model, guide = make_model_guide(vae, extra_param=True)

    def run(out_dir):
        trainer = Trainer(
            model, guide, vae, Trace_ELBO(), optim, make_data(), batch_size=BATCH, epochs=1, seed=7,
            device="cpu", out_dir=out_dir, transform=binarize, progress=False,
        )
        return losses(trainer.fit())

    first = run(tmp_path / "a")
    vae.load_state_dict(init)
    assert run(tmp_path / "b") == first


def test_keep_best_saves_the_best_epoch_and_survives_resume(tmp_path):
    """keep_best writes the weights of the epoch with the highest metric; resume keeps comparing to it."""
    scores = iter([1.0, 3.0, 2.0, 2.5])
    seen = {}

    def build_best(epochs):
        return build(tmp_path, "adam", epochs=epochs, evaluate=lambda epoch: {"score": next(scores)},
                     keep_best="score")

    t = build_best(2)
    t.fit()
    seen[2] = {k: v.clone() for k, v in t.module.state_dict().items()}
    t = build_best(4)
    t.fit(resume=True)
    best = t.load_best()
    assert best == {"epoch": 2, "metric": "score", "value": 3.0}
    assert all(torch.equal(v, seen[2][k]) for k, v in t.module.state_dict().items())
    # A fresh run in the same directory does not inherit the old best.pt.
    scores = iter([0.5])
    t = build_best(1)
    t.fit()
    assert t.load_best()["value"] == 0.5


def test_keep_best_needs_evaluate(tmp_path):
    with pytest.raises(ValueError, match="keep_best"):
        Trainer(lambda x: None, lambda x: None, torch.nn.Linear(1, 1), pyro.infer.Trace_ELBO(),
                pyro.optim.Adam({"lr": 1e-3}), torch.zeros(4, 1), batch_size=2, epochs=1, seed=0,
                device="cpu", out_dir=tmp_path, keep_best="valid_elbo")


def test_train_best_runs_a_hook_with_a_generator_term_in_its_pyro_optimiser_mode(tmp_path):
    """experiments.common.train_best (ClippedAdam, SVI mode) takes ExtraTerm hooks with generator terms."""
    from experiments.common import train_best
    from inference import PathwiseKL_ELBO
    from ppl_models import VAE

    torch.manual_seed(0)
    vae = VAE(x_dim=D, z_dim=Z, hidden=(8,))
    hook = AdversarialDiscriminator(vae)
    hook.vae = type("Decoder", (), {"dec": staticmethod(vae.decode)})()  # the critic's fakes from this VAE
    data = make_data()
    config = {"seed": 0, "eval": {"batch_size": 16},
              "train": {"epochs": 2, "batch_size": BATCH, "lr": 1e-2, "lr_final": 1e-3, "clip_norm": 100.0}}

    def batch_nll(x):
        return PathwiseKL_ELBO().loss(vae.model, vae.guide, x)

    out = train_best(vae, PathwiseKL_ELBO(), batch_nll, config, data, binarize, (data.bernoulli(),), tmp_path,
                     "cpu", resume=False, progress=False, extras=[hook])
    assert out["epochs"] == 2
    logged = read_metrics(tmp_path)
    assert all("disc/generator_loss" in m and "disc/loss" in m for m in logged)


@pytest.mark.parametrize("kind", ["adam", "diff"])
def test_validation_switch_changes_no_number_and_is_scoped_to_the_step(tmp_path, kind):
    """Trainer(validate=False) runs the step with Pyro's checks off and gives bit-identical weights to
    validate=True; Pyro's own setting outside the step is left as it was."""
    seen = []
    weights = {}
    for validate in (True, False):
        vae = make_vae()
        model, guide = make_model_guide(vae)

        def watched(x, model=model, validate=validate):
            seen.append((validate, pyro.infer.util.is_validation_enabled()))
            return model(x)

        trainer = Trainer(watched, guide, vae, Trace_ELBO(), make_optimizer(kind), make_data(), batch_size=8,
                          epochs=2, seed=3, device="cpu", out_dir=tmp_path / str(validate), progress=False,
                          validate=validate)
        assert pyro.infer.util.is_validation_enabled()  # the global default, before and after
        trainer.fit()
        assert pyro.infer.util.is_validation_enabled()
        weights[validate] = {k: v.clone() for k, v in vae.state_dict().items()}
    assert {v for v, on in seen if on} == {True} and {v for v, on in seen if not on} == {False}
    for k, v in weights[True].items():
        assert torch.equal(weights[False][k], v), k


def test_validation_default_follows_the_environment(monkeypatch, tmp_path):
    vae = make_vae()
    model, guide = make_model_guide(vae)
    for value, expected in (("1", True), ("0", False), (None, False)):
        if value is None:
            monkeypatch.delenv("SEQGEN_VALIDATE", raising=False)
        else:
            monkeypatch.setenv("SEQGEN_VALIDATE", value)
        t = Trainer(model, guide, vae, Trace_ELBO(), make_optimizer("adam"), make_data(), batch_size=8,
                    epochs=1, seed=0, device="cpu", out_dir=tmp_path, progress=False)
        assert t.validate is expected
