"""The recurrent generator of professor forcing, as a Pyro model over a sequence.

Goyal (2017), thesis, ch. 2 ("Professor forcing"), Sec. 2.3 and Eq. 2.1: a GRU generator p(x_1 … x_L) =
Π_t p(x_t | x_<t) trained by teacher forcing (the data's x_{t−1} fed in, the NLL of Eq. 2.1) and run
free (its own samples fed back). The discriminator of Eqs. 2.2-2.4 reads the **behaviour** of both modes:
the hidden states (and output distributions) of each step, through which the adversarial gradient reaches
the generator — never through the discrete samples.

Symbols to code: x_t -> site ``x_t`` (``x_1`` … ``x_L``, under :func:`pyro.markov`, observed in teacher-forced
mode, sampled in free-running mode), h_t -> the GRU's hidden state, b -> :class:`Behaviour` (``hidden``,
``logits``). Two outputs: ``"bernoulli"`` (binary pixels read in order, one per step) and ``"categorical"``
(characters of an alphabet of ``vocab`` symbols). Step 1 reads a start input: zeros for pixels, the extra
index ``vocab`` for characters.
"""

from __future__ import annotations

from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_models.base import ModelGuidePair, register_model

OUTPUTS = ("bernoulli", "categorical")


class Behaviour(NamedTuple):
    """One run's behaviour: hidden states (N, L, H) and output logits (N, L) or (N, L, V), and the sequence
    the run read and scored (the data under teacher forcing, its own samples when free-running)."""

    hidden: torch.Tensor
    logits: torch.Tensor
    x: torch.Tensor


class GRUGenerator(ModelGuidePair):
    """A one-layer GRU over a sequence of pixels or characters (see the module docstring); registered as
    ``gru-pixels`` and ``gru-chars``. It has no latent variables: its guide is empty.

    :param x_dim: the sequence length :meth:`sample` draws (pixels: the image's).
    :param output: "bernoulli" (binary values) or "categorical" (indices in 0..vocab − 1).
    :param hidden: the GRU's state size.
    :param vocab: the alphabet's size (categorical only).
    :param embed: the character embedding's size (categorical only).
    """

    param_prefix = "gru_generator"

    def __init__(self, x_dim: int = 1, output: str = "categorical", hidden: int = 256, vocab: int = 2,
                 embed: int = 32) -> None:
        super().__init__()
        if x_dim < 1:
            raise ValueError(f"x_dim (the sampled length) must be >= 1, got {x_dim}")
        self.x_dim = x_dim
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if hidden < 1 or (output == "categorical" and (vocab < 2 or embed < 1)):
            raise ValueError(f"need hidden >= 1 and, for characters, vocab >= 2 and embed >= 1; got hidden "
                             f"{hidden}, vocab {vocab}, embed {embed}")
        self.output, self.hidden_size, self.vocab = output, hidden, vocab
        if output == "categorical":
            self.embed = nn.Embedding(vocab + 1, embed)  # index vocab: the start symbol
            width, out = embed, vocab
        else:
            width, out = 1, 1
        self.gru = nn.GRU(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, out)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The inputs of steps 1 … L under teacher forcing: the start input, then x_1 … x_{L−1}."""
        if self.output == "categorical":
            x = x.long()  # indices may arrive as floats (data tensors are float elsewhere in the library)
            start = torch.full_like(x[:, :1], self.vocab)
            return self.embed(torch.cat([start, x[:, :-1]], 1))
        x = x.to(self.head.weight.dtype)
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1).unsqueeze(-1)

    def _step_input(self, x_t: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
        if self.output == "categorical":
            idx = torch.full((n,), self.vocab, device=device) if x_t is None else x_t
            return self.embed(idx.long()).unsqueeze(1)
        value = torch.zeros(n, device=device) if x_t is None else x_t
        return value.reshape(n, 1, 1).to(self.head.weight.dtype)

    def _dist(self, logits: torch.Tensor) -> dist.TorchDistribution:
        """p(x_t | x_<t) from a step's logits ((N, V) for characters, (N,) for pixels)."""
        if self.output == "categorical":
            return dist.Categorical(logits=logits)
        return dist.Bernoulli(logits=logits)

    def _step(self, x_t: torch.Tensor | None, h: torch.Tensor | None,
              n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One free-running step reading ``x_t`` (None: the start input): (state h_t (N, H), the GRU's
        carried state, the step's logits)."""
        out, h = self.gru(self._step_input(x_t, n, self.head.weight.device), h)
        logits = self.head(out[:, 0])
        return out[:, 0], h, logits if self.output == "categorical" else logits.squeeze(-1)

    def teacher_forced(self, x: torch.Tensor) -> Behaviour:
        """Run on the data (N, L): step t reads x_{t−1}. Logits of p(x_t | x_<t) for every step."""
        h, _ = self.gru(self._inputs(x))
        logits = self.head(h)
        return Behaviour(h, logits if self.output == "categorical" else logits.squeeze(-1), x)

    def free_running(self, n: int, length: int) -> Behaviour:
        """Run ``length`` steps from the start input, each step reading the previous step's **sample**. The
        hidden states keep their gradient; the samples are discrete and carry none."""
        h, x_t, states, logits, xs = None, None, [], [], []
        for _ in range(length):
            state, h, step_logits = self._step(x_t, h, n)
            x_t = self._dist(step_logits).sample()
            states.append(state)
            logits.append(step_logits)
            xs.append(x_t)
        return Behaviour(torch.stack(states, 1), torch.stack(logits, 1), torch.stack(xs, 1))

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_t log p(x_t | x_<t) per sequence (N,), by teacher forcing."""
        b = self.teacher_forced(x)
        target = x.to(b.logits.dtype) if self.output == "bernoulli" else x.long()
        return self._dist(b.logits).log_prob(target).sum(-1)

    def model(self, x: torch.Tensor | None = None, num_samples: int | None = None,
              length: int | None = None) -> torch.Tensor:
        """The Pyro model: sites ``x_1`` … ``x_L`` under :func:`pyro.markov`, observed from ``x`` (teacher
        forcing: the GRU reads the data) or, without ``x``, sampled and fed back (``num_samples`` sequences of
        ``length``). Returns the sequence."""
        self.register_params()
        length = self.x_dim if length is None else length
        if x is None and num_samples is None:
            raise ValueError("the model needs data x, or num_samples to run free")
        if x is not None:
            n, length = x.shape
            logits = self.teacher_forced(x).logits
        else:
            n = num_samples
        h, x_t, xs = None, None, []
        with pyro.plate("data", n):
            for t in pyro.markov(range(length)):
                if x is not None:  # teacher forcing: the logits of the GRU run on the data
                    step_logits = logits[:, t]
                    obs = x[:, t].to(step_logits.dtype) if self.output == "bernoulli" else x[:, t].long()
                else:  # free running: the step reads the previous site's sample
                    _, h, step_logits = self._step(x_t, h, n)
                    obs = None
                x_t = pyro.sample(f"x_{t + 1}", self._dist(step_logits), obs=obs)
                xs.append(x_t)
        return torch.stack(xs, 1)

    def guide(self, x: torch.Tensor | None = None, num_samples: int | None = None,
              length: int | None = None) -> None:
        """No latent variables: every site is observed under teacher forcing."""

    @property
    def latent_sites(self) -> tuple[str, ...]:
        return ()

    def guide_parameters(self) -> list[nn.Parameter]:
        return []

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Free runs of ``x_dim`` steps: for pixels the probability of each pixel given the sampled ones
        before it (the image's means), for characters the sampled indices."""
        b = self.free_running(num_samples, self.x_dim)
        return torch.sigmoid(b.logits) if self.output == "bernoulli" else b.x


register_model("gru-pixels", GRUGenerator, kind="generator", output="bernoulli",
               about="professor forcing's GRU generator over binary pixels read in order (Goyal 2017, ch. 2)")
register_model("gru-chars", GRUGenerator, kind="generator", output="categorical",
               about="professor forcing's GRU generator over characters (Goyal 2017, ch. 2)")
