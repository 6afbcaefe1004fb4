"""The goal-conditioned RL generator (Vargas Vieyra & Ménard, Sec. 2-3, Alg. 1-3): the MDP of Eq. 5, the
Double-DQN target, the dueling head, the soft update, the exploration penalty, the three replay buffers,
sampling without a goal, and the bound of Eq. 2 as an ELBO (its value by hand, and that it improves)."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

from inference.gcrl import (
    GCAgentUpdate,
    Replay,
    ReplayBuffer,
    SAgentUpdate,
    double_dqn_target,
    soft_update,
    step_losses,
)
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from inference.train import Trainer
from ppl_models.gcrl import GCRLGenerator

SMALL = {"x_dim": 16, "steps": 4, "actions": 3, "channels": 4, "mult": (1, 2), "groups": 2, "embed_dim": 4,
         "select_channels": 4}


def _pair(**kw) -> GCRLGenerator:
    torch.manual_seed(0)
    return GCRLGenerator(**{**SMALL, **kw})


def _goals(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 16, generator=torch.Generator().manual_seed(1))


def test_the_state_follows_eq_5_and_the_final_mean_is_the_rate_weighted_sum_of_proposals():
    pair = _pair()
    a = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 0]])
    x, by_hand = torch.zeros(2, 16), torch.zeros(2, 16)
    for h in range(1, 5):
        y = pair.s_agent.prop(x, h, a[:, h - 1])
        x = x + y / h  # α_h = 1/h
        by_hand = by_hand + y / h  # from x_1 = 0: Σ_h y_h / h
    torch.testing.assert_close(pair.unfold(a), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(pair.unfold(a), by_hand, rtol=0, atol=1e-6)
    # The model's final Gaussian step is centred there, with the selections the trace drew.
    trace = poutine.trace(pair.model).get_trace(None, num_samples=2)
    drawn = torch.stack([trace.nodes[f"z_{h}"]["value"] for h in range(4)], -1)
    torch.testing.assert_close(trace.nodes["x"]["fn"].base_dist.loc, pair.unfold(drawn), rtol=0, atol=1e-6)
    # Other rates are honoured the same way.
    other = _pair(rates=[1.0, 0.25, 0.25, 0.5])
    x = torch.zeros(2, 16)
    for h, r in enumerate([1.0, 0.25, 0.25, 0.5], start=1):
        x = x + r * other.s_agent.prop(x, h, a[:, h - 1])
    torch.testing.assert_close(other.unfold(a), x, rtol=0, atol=1e-6)


def test_the_double_dqn_target_takes_the_online_argmin_and_the_target_networks_value():
    pair = _pair()
    agent = pair.gc_agent
    for b in agent.target_weights().values():  # a target network different from the online one
        b.add_(0.3 * torch.randn_like(b))
    g = _goals(5)
    x, step = torch.rand(5, 16), torch.tensor([1, 2, 3, 4, 2])
    loss = torch.tensor([0.0, 0.0, 0.0, 7.0, 0.0])
    got = double_dqn_target(agent, x, step, g, loss, steps=4)
    with torch.no_grad():
        nxt = torch.tensor([2, 3, 4, 4, 3])
        online, target = agent.q(x, nxt, g), agent.q(x, nxt, g, target=True)
    want = target.gather(-1, online.argmin(-1, keepdim=True)).squeeze(-1)
    want[3] = 7.0  # the last step: the loss alone
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got[:3], target.min(-1).values[:3])  # not plain DQN's min over the target


def test_the_dueling_heads_advantages_have_zero_mean():
    qnet = _pair().gc_agent.qnet
    x, g = torch.rand(7, 16), _goals(7)
    adv, value = qnet.advantages(x, 2, g)
    q = qnet(x, 2, g)
    torch.testing.assert_close(q.mean(-1), value.squeeze(-1))
    torch.testing.assert_close((q - value).mean(-1), torch.zeros(7), atol=1e-6, rtol=0)
    assert adv.mean(-1).abs().max() > 1e-4  # the head's raw scores are not centred: the centring does it


def test_the_soft_update_moves_the_target_by_exactly_rho():
    agent = _pair().gc_agent
    with torch.no_grad():
        for p in agent.qnet.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in agent.target_weights().items()}
    online = dict(agent.qnet.named_parameters())
    soft_update(agent, 0.06)
    for name, b in agent.target_weights().items():
        torch.testing.assert_close(b, 0.06 * online[name].detach() + 0.94 * before[name])
    with pytest.raises(ValueError, match="rho must be in"):
        soft_update(agent, 0.0)


def test_the_exploration_penalty_changes_the_choice_as_kappa_grows(monkeypatch):
    pair = _pair()
    q = torch.tensor([[1.0, 1.1, 1.5]])
    s = torch.tensor([[0.85, 0.1, 0.05]]).log()  # the S-agent rarely picks index 1 or 2
    monkeypatch.setattr(pair.gc_agent, "q", lambda x, h, goal, target=False: q)
    monkeypatch.setattr(pair, "select_logits", lambda x, h: s)
    x, g = torch.zeros(1, 16), torch.zeros(1, 16)
    chosen = []
    for kappa in (0.0, 0.05, 1.0):
        pair.kappa = kappa
        chosen.append(int(pair.gc_scores(x, 1, g).argmin()))
    # κ = 0: the lowest Q; κ = 0.05: 1.1 + 0.05 log 0.1 < 1.0 + 0.05 log 0.85; κ = 1: the rarest index wins
    assert chosen == [0, 1, 2]


def test_the_replay_buffers_store_what_alg_1_records_and_stay_bounded():
    pair = _pair()
    g = _goals(6)
    replay = Replay(16, 4, capacity=100, trajectory_capacity=10)
    loss = SAgentUpdate(pair, g, replay, loss_scale=2.0)
    loss.collect(g[:3], torch.tensor([0, 1, 2]))
    roll = pair.rollout(g[:3])
    assert len(replay.gc) == len(replay.select) == 3 * 4 and len(replay.prop) == 3
    gc = {k: getattr(replay.gc, f"data_{k}")[:12] for k in replay.gc.fields}
    # row order: step-major (h = 1 for the three goals, then h = 2, ...)
    torch.testing.assert_close(gc["state"], roll["states"][:-1].reshape(12, 16))
    torch.testing.assert_close(gc["next_state"], roll["states"][1:].reshape(12, 16))
    assert gc["step"].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert gc["selection"].tolist() == roll["selections"].reshape(-1).tolist()
    assert gc["goal"].tolist() == [0, 1, 2] * 4
    final_loss = 2.0 * (roll["states"][-1] - g[:3]).pow(2).sum(-1)
    torch.testing.assert_close(gc["loss"][-3:], final_loss)
    assert gc["loss"][:9].abs().sum() == 0  # ℓ_h = 0 before the last step
    torch.testing.assert_close(replay.select.data_state[:12], gc["state"])
    assert replay.prop.data_selections[:3].tolist() == roll["selections"].T.tolist()
    assert replay.prop.data_goal[:3].tolist() == [0, 1, 2]
    torch.testing.assert_close(step_losses(pair, roll["states"][-1], g[:3], 2.0)[-1], final_loss)
    # sampled rows are stored rows, every field from the same row
    def stored_row(buf: ReplayBuffer, row: dict) -> bool:
        return any(all(torch.equal(getattr(buf, f"data_{k}")[j], row[k]) for k in buf.fields)
                   for j in range(len(buf)))

    for buf in (replay.gc, replay.select, replay.prop):
        rows = buf.sample(20)
        assert all(stored_row(buf, {k: v[i] for k, v in rows.items()}) for i in range(20))
    # bounded: more collections than room; the oldest rows go first in every buffer
    small = Replay(16, 4, capacity=20, trajectory_capacity=10)
    loss = SAgentUpdate(pair, g, small)
    for i in range(5):  # 5 × 3 trajectories: 60 transitions for 20 rows, 15 trajectories for 10
        loss.collect(g[:3], torch.tensor([3, 4, 5]) if i == 4 else torch.tensor([0, 1, 2]))
    assert (len(small.gc), len(small.select), len(small.prop)) == (20, 20, 10)
    assert int(small.gc.count) == 60 and int(small.prop.count) == 15
    assert small.prop.data_goal.tolist().count(3) == 1 and small.gc.data_goal.tolist().count(3) == 4


def test_a_replay_buffer_explains_bad_use():
    buf = ReplayBuffer(4, {"a": ((), torch.long)})
    with pytest.raises(ValueError, match="empty"):
        buf.sample(1)
    with pytest.raises(ValueError, match="exactly the fields"):
        buf.push(b=torch.zeros(2))
    with pytest.raises(ValueError, match="capacity must be"):
        ReplayBuffer(0, {"a": ((), torch.long)})
    buf.push(a=torch.arange(7))  # more than the room: the newest 4
    assert sorted(buf.data_a.tolist()) == [3, 4, 5, 6]


def test_sampling_needs_no_goal_and_no_gc_agent():
    pair = _pair()
    pair.gc_agent = None  # Alg. 3 uses the S-agent alone
    torch.manual_seed(3)
    x = pair.sample(5)
    assert x.shape == (5, 16) and 0 <= x.min() and x.max() <= 1
    assert pair.model(None, num_samples=5).shape == (5, 16)


def test_the_bound_is_eq_2_with_the_analytic_categorical_kl_per_step():
    pair = _pair(sigma2=0.3).double()
    g = _goals(4).double()
    elbo = PathwiseKL_ELBO(strict=True)
    assert {k.kind for k in elbo.kl_report(pair.model, pair.guide, g).values()} == {"analytic"}
    got = elbo.loss(pair.model, pair.guide, g)
    # by hand: the greedy GC-agent's path, −log N(x̃; x_{H+1}, σ²) + Σ_h −log S-select(a_h | x_h, h)
    with torch.no_grad():
        roll = pair.rollout(g)
        nll = -torch.distributions.Normal(roll["states"][-1], math.sqrt(pair.sigma2)).log_prob(g).sum()
        path = zip(roll["states"][:-1], roll["selections"], strict=True)
        kl = sum(-torch.log_softmax(pair.select_logits(s, h), -1).gather(-1, a[:, None]).sum()
                 for h, (s, a) in enumerate(path, start=1))
    assert got == pytest.approx(float(nll + kl), rel=1e-9)
    # the Boltzmann guide: logits −(Q + κ log S)/τ, the greedy agent as τ → 0
    x0 = pair.start(4)
    scores = pair.gc_scores(x0, 1, g)
    torch.testing.assert_close(pair.gc_policy(x0, 1, g, tau=0.5).logits, torch.log_softmax(-scores / 0.5, -1))
    cold = pair.gc_policy(x0, 1, g, tau=1e-6).probs
    torch.testing.assert_close(cold, torch.nn.functional.one_hot(scores.argmin(-1), 3).double())
    # ... and its IWAE-K is tighter than its bound, on average over goals
    pair.tau = 0.5
    from inference.scoring import score_bound_and_iwae

    s = score_bound_and_iwae(pair.model, pair.guide, g, bound_draws=64, iw_samples=64, batch_size=4)
    assert torch.isfinite(s.bound).all() and float(s.iwae.mean()) < float(s.bound.mean())


def _train(out, epochs: int, resume: bool = False):
    pyro.clear_param_store()
    pair = _pair()
    x = _goals(32)
    replay = Replay(16, 4, capacity=200, trajectory_capacity=40)
    loss = SAgentUpdate(pair, x, replay)
    hook = GCAgentUpdate(pair, loss, lr=3e-3, rho=0.06, batch_size=8)
    trainer = Trainer(pair.model, pair.guide, pair.s_agent, loss, lambda ps: torch.optim.Adam(ps, lr=3e-3),
                      (x, torch.arange(32)), 8, epochs, 0, "cpu", out, extras=[hook], progress=False)
    return pair, trainer.fit(resume=resume), x


def test_the_bound_is_finite_and_improves_over_a_short_run(tmp_path):
    pair, _, x = _train(tmp_path / "a", 0)
    elbo = PathwiseKL_ELBO()
    pair.fit_sigma2(x)
    before = elbo.loss(pair.model, pair.guide, x) / 32
    pair, metrics, _ = _train(tmp_path / "b", 12)
    pair.fit_sigma2(x)
    after = elbo.loss(pair.model, pair.guide, x) / 32
    assert math.isfinite(before) and math.isfinite(after) and after < before - 1
    logged = {"gcrl/q_loss", "gcrl/select_entropy", "gcrl/reconstruction_mse", "gcrl/usage_entropy"}
    assert logged <= set(metrics[-1])


def test_resume_continues_exactly_with_the_replay_in_the_checkpoint(tmp_path):
    whole, _, _ = _train(tmp_path / "whole", 3)
    _train(tmp_path / "split", 2)
    split, _, _ = _train(tmp_path / "split", 3, resume=True)
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_each_update_touches_only_its_own_networks():
    pair = _pair()
    g = _goals(8)
    replay = Replay(16, 4, capacity=100, trajectory_capacity=20)
    loss = SAgentUpdate(pair, g, replay)
    hook = GCAgentUpdate(pair, loss, lr=1e-2, rho=0.06, batch_size=8)
    loss.differentiable_loss(pair.model, pair.guide, g, torch.arange(8)).backward()
    assert all(p.grad is None for p in pair.gc_agent.parameters())  # the S-agent's loss never reaches ψ
    assert any(p.grad is not None for p in pair.s_agent.parameters())
    for p in pair.s_agent.parameters():
        p.grad = None
    s_before = {k: v.clone() for k, v in pair.s_agent.state_dict().items()}
    t_before = {k: v.clone() for k, v in pair.gc_agent.target_weights().items()}
    hook.step(None)
    assert all(torch.equal(v, pair.s_agent.state_dict()[k]) for k, v in s_before.items())
    assert all(p.grad is None for p in pair.s_agent.parameters())  # the Q-loss never reaches θ, φ
    online = dict(pair.gc_agent.qnet.named_parameters())
    for name, b in pair.gc_agent.target_weights().items():  # after the Q step, the target moved by ρ
        torch.testing.assert_close(b, 0.06 * online[name].detach() + 0.94 * t_before[name])


def test_a_non_finite_q_loss_stops_training_cleanly(tmp_path, monkeypatch):
    from inference.train import NonFiniteLossError

    pair = _pair()
    x = _goals(16)
    replay = Replay(16, 4, capacity=100, trajectory_capacity=20)
    loss = SAgentUpdate(pair, x, replay)
    hook = GCAgentUpdate(pair, loss, lr=1e-3, rho=0.06, batch_size=8)
    monkeypatch.setattr(loss, "loss_scale", float("nan"))  # every recorded ℓ_H is NaN
    trainer = Trainer(pair.model, pair.guide, pair.s_agent, loss, lambda ps: torch.optim.Adam(ps, lr=1e-3),
                      (x, torch.arange(16)), 8, 1, 0, "cpu", tmp_path, extras=[hook], progress=False)
    before = {k: v.clone() for k, v in pair.gc_agent.state_dict().items()}
    with pytest.raises(NonFiniteLossError):
        trainer.fit()
    assert all(torch.equal(v, pair.gc_agent.state_dict()[k]) for k, v in before.items())  # ψ not stepped
