"""Building blocks shared by the sequential policies: step distributions, LSTM cores, the infinite-mixture
initial state, and the canvas (imputation constructor) update.

Bachman & Precup (2015), "Data generation as sequential decision making": Sec. 2.4-2.5 (the DRAW-style
generators, Eqs. 10-13), Sec. 3.1-3.2 (the imputation policies), Sec. 9.1 (sizes). Every sequential
model in ``ppl_models`` (GPSI, the LSTM imputers, the DRAW-style generators) builds its primary policy p
and guide policy q from these pieces, so the step code exists once.

Symbols to code:

- a step distribution p_t(z_t | ·) or q_t(z_t | ·), a diagonal Gaussian whose means and log-variances are
  an affine function of a state (paper: L_θ(v_t)) -> :func:`diag_normal` applied to the output of a
  :class:`torch.nn.Linear` or an MLP with ``2 * z_dim`` outputs;
- an LSTM state s_t = [h_t; v_t] and its update f_θ -> :func:`lstm_cell` (``torch.nn.LSTMCell``; the state is
  the pair (h, cell));
- the infinite-mixture initialisation s_0 = f_θ(z_0) -> :class:`InitialStates`;
- the canvas c_t and the imputation constructor ω -> :func:`update_canvas` (``"add"``: c_t = c_{t-1} +
  ω(·); ``"jump"``: c_t = ω(·));
- p's deterministic path (s_t, c_t) along a trajectory's draws, which q computes (it reads p's state and
  canvas) and the model's replay of the same draws takes from q instead of computing again ->
  :class:`SharedPath`.

Deviations from the paper's Theano code, all deliberate: ``torch.nn.LSTMCell`` has no peephole
connections; no Gaussian noise is added to LSTM states. The forget-gate bias starts at +2 as in that
code, so early in training the LSTMs keep their state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

UPDATES = ("add", "jump")

#: smallest standard deviation of a step distribution; keeps the log-density finite early in training
MIN_SCALE = 1e-4


def mlp(sizes: list[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def initial_canvas(x_dim: int, init_mean: torch.Tensor | None = None) -> nn.Parameter:
    """The trainable c_0 (paper Sec. 3.1: "c_0 from a trainable bias"): zeros, or the logit of the mean
    training image so that the first guess is the mean pixel value, as the paper's code filled unknowns."""
    c0 = torch.zeros(x_dim)
    if init_mean is not None:
        c0 = torch.logit(init_mean.detach().float().cpu().clamp(1e-3, 1 - 1e-3)).reshape(x_dim)
    return nn.Parameter(c0)


def check_sizes(**sizes: int) -> None:
    """Raise a ValueError naming every size that is not a positive integer (layer widths, dimensions, T)."""
    bad = {name: v for name, v in sizes.items() if v < 1}
    if bad:
        raise ValueError(f"{', '.join(sizes)} must be >= 1, got {bad}")


def check_update(update: str) -> str:
    """The canvas update name, validated: ``"add"`` or ``"jump"``."""
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES} (c_t = c_(t-1) + ω or c_t = ω), got {update!r}")
    return update


def diag_normal(params: torch.Tensor) -> dist.TorchDistribution:
    """A diagonal Gaussian step distribution from ``2 * z_dim`` affine outputs (means, pre-scales).

    The scale is softplus(pre) + ``MIN_SCALE`` rather than exp(log-variance): the same family, with a
    gradient that cannot explode when the network output drifts.
    """
    loc, pre_scale = params.chunk(2, dim=-1)
    return dist.Normal(loc, F.softplus(pre_scale) + MIN_SCALE).to_event(1)


def cat_inputs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate network inputs along the last dimension after broadcasting their batch dimensions.

    Under a vectorised particle plate (IWAE, importance sampling) the states carry a leading particle
    dimension while the data and the mask do not; broadcasting lets one code path serve both.
    """
    batch = tensors[0].shape[:-1]
    if any(t.shape[:-1] != batch for t in tensors[1:]):
        # (torch.broadcast_shapes is Python code worth skipping where the shapes agree, as in training.)
        shape = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
        tensors = [t.expand(*shape, t.shape[-1]) for t in tensors]
    return torch.cat(tensors, -1)


def lstm_cell(input_dim: int, hidden_dim: int, forget_bias: float = 2.0) -> nn.LSTMCell:
    """An LSTM cell whose forget-gate bias starts at ``forget_bias`` (the paper's code used +2)."""
    cell = nn.LSTMCell(input_dim, hidden_dim)
    with torch.no_grad():
        # torch orders the gates (input, forget, cell, output); both bias vectors are added.
        cell.bias_ih[hidden_dim : 2 * hidden_dim].fill_(forget_bias / 2)
        cell.bias_hh[hidden_dim : 2 * hidden_dim].fill_(forget_bias / 2)
    return cell


def lstm_step(
    cell: nn.LSTMCell, inputs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """s_t = f(s_{t-1}, input) for any leading batch dimensions (``nn.LSTMCell`` takes only one): the
    particle dimension of vectorised importance sampling is folded into the batch and unfolded after."""
    h, c = state
    shape = torch.broadcast_shapes(inputs.shape[:-1], h.shape[:-1])
    flat = (-1, cell.hidden_size)
    h, c = cell(
        inputs.expand(*shape, inputs.shape[-1]).reshape(-1, inputs.shape[-1]),
        (h.expand(*shape, h.shape[-1]).reshape(flat), c.expand(*shape, c.shape[-1]).reshape(flat)),
    )
    return h.reshape(*shape, -1), c.reshape(*shape, -1)


class InitialStates(nn.Module):
    """The infinite-mixture initial step s_0 = f_θ(z_0) (paper Sec. 2.5, 3.2, 9.1): one tanh hidden layer
    maps z_0 to the initial (h, cell) pair of each of ``num_lstms`` LSTMs."""

    def __init__(self, z0_dim: int, hidden: int, lstm_dim: int, num_lstms: int) -> None:
        super().__init__()
        self.lstm_dim, self.num_lstms = lstm_dim, num_lstms
        self.net = nn.Sequential(
            nn.Linear(z0_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * lstm_dim * num_lstms)
        )

    def forward(self, z0: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        chunks = self.net(z0).chunk(2 * self.num_lstms, dim=-1)
        return [(chunks[2 * i], chunks[2 * i + 1]) for i in range(self.num_lstms)]


def update_canvas(canvas: torch.Tensor, write: torch.Tensor, update: str) -> torch.Tensor:
    """c_t = c_{t-1} + ω(·) for ``"add"``, c_t = ω(·) for ``"jump"``; ``write`` is ω's output."""
    return canvas + write if update == "add" else write


def writer_step(
    cell: nn.LSTMCell, write: nn.Module, z: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor],
    canvas: torch.Tensor, update: str,
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One step of an LSTM writer: s_t = f(s_{t-1}, z_t), then the canvas update. ``"add"`` writes from the
    visible output (c_t = c_{t-1} + ω(v_t)); ``"jump"`` from the LSTM memory (c_t = L(h_t), torch's cell
    state), as the paper's LSTM-jump code and its c_T = L_θ(h_T) generator did. Returns (s_t, c_t)."""
    state = lstm_step(cell, z, state)
    return state, update_canvas(canvas, write(state[0] if update == "add" else state[1]), update)


def stack_canvases(canvases: list[torch.Tensor]) -> torch.Tensor:
    """c_0..c_T stacked to (T + 1, ..., D). c_0 has no particle dimension under vectorised importance
    sampling while the later canvases may, so they are broadcast first."""
    if any(c.shape != canvases[0].shape for c in canvases[1:]):
        shape = torch.broadcast_shapes(*(c.shape for c in canvases))
        canvases = [c.expand(shape) for c in canvases]
    return torch.stack(canvases)


_T = TypeVar("_T")

#: Whether :class:`SharedPath` hands the guide's path to the model (see :func:`shared_paths`).
_SHARING = [True]
#: The open :func:`guide_model_pair` scopes, innermost last: the paths recorded in each.
_SCOPES: list[list[SharedPath]] = []


@contextlib.contextmanager
def shared_paths(enabled: bool) -> Iterator[None]:
    """Within the block, the model's replay takes p's writer path from the guide inside each
    :func:`guide_model_pair` (``True``, the default) or computes it again as a separate roll-out
    (``False``: the two programs' plain cost, for a benchmark or a check)."""
    before, _SHARING[0] = _SHARING[0], bool(enabled)
    try:
        yield
    finally:
        _SHARING[0] = before


@contextlib.contextmanager
def guide_model_pair() -> Iterator[None]:
    """The scope of one guide run and the model run that replays it, with no parameter change between:
    inside it :class:`SharedPath` records the guide's path and hands it to the model; on leaving it every
    record made inside is dropped. The objectives enter it around each guide/model pair
    (:class:`inference.pathwise_kl_elbo.PathwiseKL_ELBO`, :mod:`inference.iwae`'s importance traces, hence
    ``IWAE_ELBO`` and the importance-sampled scores); outside it nothing is recorded or reused (Pyro's own
    ``Trace_ELBO``, a guide or a model run alone)."""
    recorded: list[SharedPath] = []
    _SCOPES.append(recorded)
    try:
        yield
    finally:
        _SCOPES.pop()
        for path in recorded:
            path._clear()


class SharedPath:
    r"""p's deterministic path along one trajectory's draws, computed once for a guide run and the model
    run that replays it.

    The objectives here score the model along the guide's draws (``PathwiseKL_ELBO``, ``IWAE_ELBO``, the
    importance-sampled scores): the guide q runs first, and it rolls out p's writer along its own draws,
    because q reads p's state and canvas (DRAW's error image, the imputers' current guess). The model then
    rolls the same writer out again along the *same* draws, which Pyro's replay hands over as the very
    tensors q sampled. The writer's path (s_t, c_t) is a function of the draws and θ alone, so the model can
    take q's: one roll-out of the writer per step instead of two (GPSI's ω, the LSTM imputers' and DRAW's
    writer LSTM and write, the initial states f_θ(z_0)). Values are the same tensors; gradients are the same
    sums, their terms added in another order (float round-off). A compiler finds this saving in a
    hand-written loss by common-subexpression elimination; Pyro's two programs hide it from one.

    Only inside a :func:`guide_model_pair` scope, which the objectives open around each guide run and the
    model run that replays it: there the guide :meth:`begin`\ s with ``record=True`` and each :meth:`step`
    computes and records; the model begins with ``record=False``, and a step is taken from the record only
    while every draw so far is the recorded tensor itself (``is``) and grad mode is as recorded; otherwise,
    from that step on, it computes afresh. The scope's exit drops the record, so nothing recorded outlives
    the pair: no optimiser step can come between a record and its use. Outside a scope each roll-out
    computes everything. A copy (``copy.deepcopy``, pickling) starts empty.
    """

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self._steps: list[tuple[torch.Tensor, Any]] = []
        self._grad: bool | None = None
        self._mode, self._pos = "off", 0

    def begin(self, record: bool) -> SharedPath:
        """Start a roll-out: the guide's (``record``) or the model's."""
        self._pos = 0
        if not _SCOPES or not _SHARING[0]:
            self._mode = "off"
        elif record:
            self._steps, self._grad, self._mode = [], torch.is_grad_enabled(), "record"
            _SCOPES[-1].append(self)
        else:
            same = self._grad == torch.is_grad_enabled()
            self._mode = "replay" if same and self._steps else "off"
        return self

    def step(self, draw: torch.Tensor, compute: Callable[..., _T], *args: Any) -> _T:
        """The next deterministic step after ``draw``: ``compute(*args)``, or the recorded result where the
        model replays the guide's draws."""
        if self._mode == "record":
            out = compute(*args)
            self._steps.append((draw, out))
            return out
        if self._mode == "replay":
            i, self._pos = self._pos, self._pos + 1
            if i < len(self._steps) and self._steps[i][0] is draw:
                return self._steps[i][1]
            self._mode = "off"  # the paths diverged: every later step depends on this one
        return compute(*args)

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedPath:
        return SharedPath()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._clear()

    def __repr__(self) -> str:
        return f"SharedPath({len(self._steps)} steps recorded)"
