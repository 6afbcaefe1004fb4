"""The professor-forcing generator against hand-written answers: the teacher-forced Pyro log-likelihood is
the cross-entropy of the same GRU written by hand, and free running feeds back its own samples (a test that
breaks if the data leaked in)."""

import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F

from ppl_models.gru_generator import GRUGenerator


def _hand_log_likelihood(gen: GRUGenerator, x: torch.Tensor) -> torch.Tensor:
    """Σ_t log p(x_t | x_<t) with torch.nn.GRUCell-style equations written out, step by step."""
    w_ih, w_hh = gen.gru.weight_ih_l0, gen.gru.weight_hh_l0
    b_ih, b_hh = gen.gru.bias_ih_l0, gen.gru.bias_hh_l0
    n, L = x.shape
    h = torch.zeros(n, gen.hidden_size, dtype=w_ih.dtype)
    total = torch.zeros(n, dtype=w_ih.dtype)
    for t in range(L):
        if gen.output == "categorical":
            prev = torch.full((n,), gen.vocab) if t == 0 else x[:, t - 1]
            inp = gen.embed.weight[prev]
        else:
            inp = (torch.zeros(n) if t == 0 else x[:, t - 1]).to(w_ih.dtype)[:, None]
        gi, gh = inp @ w_ih.T + b_ih, h @ w_hh.T + b_hh
        H = gen.hidden_size  # gate order of torch's GRU: reset, update, new
        r = torch.sigmoid(gi[:, :H] + gh[:, :H])
        z = torch.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
        c = torch.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
        h = (1 - z) * c + z * h
        logits = h @ gen.head.weight.T + gen.head.bias
        if gen.output == "categorical":
            total = total - F.cross_entropy(logits, x[:, t], reduction="none")
        else:
            total = total - F.binary_cross_entropy_with_logits(logits[:, 0], x[:, t].to(w_ih.dtype),
                                                               reduction="none")
    return total


@pytest.mark.parametrize("output", ["categorical", "bernoulli"])
def test_the_teacher_forced_pyro_log_likelihood_is_the_hand_written_cross_entropy(output):
    torch.manual_seed(0)
    gen = GRUGenerator(9, output, hidden=7, vocab=5, embed=3).double()
    x = torch.randint(0, 5 if output == "categorical" else 2, (4, 9))
    by_hand = _hand_log_likelihood(gen, x)
    assert torch.allclose(gen.log_likelihood(x), by_hand, atol=1e-10)
    trace = poutine.trace(gen.model).get_trace(x)
    sites = [name for name, site in trace.nodes.items() if site["type"] == "sample" and name != "data"]
    assert sites == [f"x_{t}" for t in range(1, 10)] and all(trace.nodes[s]["is_observed"] for s in sites)
    assert float(trace.log_prob_sum().detach()) == pytest.approx(float(by_hand.sum().detach()), abs=1e-9)


@pytest.mark.parametrize("output", ["categorical", "bernoulli"])
def test_free_running_feeds_back_its_own_samples(output, monkeypatch):
    torch.manual_seed(1)
    gen = GRUGenerator(4, output, hidden=6, vocab=4, embed=3)
    read = []
    step_input = gen._step_input

    def recording(x_t, n, device):
        read.append(None if x_t is None else x_t.clone())
        return step_input(x_t, n, device)

    monkeypatch.setattr(gen, "_step_input", recording)
    b = gen.free_running(5, 8)
    assert b.hidden.shape == (5, 8, 6) and b.hidden.requires_grad and not b.x.requires_grad
    # step 1 reads the start input, step t + 1 reads exactly step t's sample: nothing else comes in
    assert read[0] is None and all(torch.equal(read[t + 1], b.x[:, t]) for t in range(7))
    # the teacher-forced run on those samples reproduces the free run's states: the same function
    tf = gen.teacher_forced(b.x)
    assert torch.allclose(tf.hidden, b.hidden, atol=1e-6) and torch.allclose(tf.logits, b.logits, atol=1e-6)
    # the Pyro model without data samples its sites, each read by the next step
    read.clear()
    trace = poutine.trace(gen.model).get_trace(num_samples=3, length=4)
    values = [trace.nodes[f"x_{t}"]["value"] for t in range(1, 5)]
    assert not any(trace.nodes[f"x_{t}"]["is_observed"] for t in range(1, 5))
    assert read[0] is None and all(torch.equal(read[t + 1], values[t]) for t in range(3))
    with pytest.raises(ValueError, match="needs data x, or num_samples"):
        gen.model()
