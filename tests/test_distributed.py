"""Data-parallel training (inference.distributed, Trainer under torchrun) checked on the CPU with gloo and
two processes: one DistributedDataParallel step of two processes equals a single-process step on the
concatenated minibatch (the parameters after the update agree in float64), in both of the Trainer's modes,
with a hook's network, its generator term and gradient clipping; only rank 0 writes files; a two-process
run resumed from its checkpoint continues exactly (every process's RNG and generator states are in it); a
checkpoint is refused by another number of processes; too small a minibatch for the processes is refused
clearly."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.multiprocessing as mp
from pyro.infer import Trace_ELBO, TraceGraph_ELBO
from pyro.infer.elbo import ELBO
from torch import nn

from inference import checkpoint, distributed
from inference.train import ExtraTerm, Trainer

D, Z, N, BATCH = 6, 2, 16, 8


class _AutoEncoder(nn.Module):
    """x ~ N(dec(z), 1), z ~ N(0, 1); guide z = enc(x) (a point: a loss without noise) or N(enc(x), 0.5)."""

    def __init__(self, stochastic: bool):
        super().__init__()
        self.stochastic = stochastic
        self.enc, self.dec = nn.Linear(D, Z), nn.Linear(Z, D)

    def model(self, x):
        pyro.module("ae", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z_0", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("ae", self)
        with pyro.plate("data", x.shape[0]):
            loc = self.enc(x)
            d = dist.Normal(loc, 0.5) if self.stochastic else dist.Delta(loc)
            pyro.sample("z_0", d.to_event(1))


class _Critic(ExtraTerm):
    """A hook with its own network and a mean loss (its gradients are averaged over processes), adding a
    generator term summed over the shard (summed over processes with the ELBO's gradients)."""

    name = "critic"

    def __init__(self, main: _AutoEncoder):
        self.main = main
        self.module = nn.Linear(D, 1).double()
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=0.05)

    def generator_loss(self, batch):
        return 0.1 * self.module(self.main.dec(self.main.enc(batch))).sum()

    def step(self, batch):
        loss = (self.module(batch) - 1.0).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach())}


def _data() -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _trainer(out: Path, mode: str, stochastic: bool, epochs: int,
             loss: ELBO | None = None) -> tuple[Trainer, _AutoEncoder, _Critic]:
    torch.manual_seed(0)  # same initial weights everywhere (rank 0's are broadcast anyway)
    module = _AutoEncoder(stochastic).double()
    critic = _Critic(module)
    optim = (pyro.optim.Adam({"lr": 0.05}) if mode == "svi"
             else (lambda ps: torch.optim.SGD(ps, lr=0.05)))  # SGD: sensitive to the gradient scale
    def jitter(x, g):
        return x + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype)

    transform = jitter if stochastic else None
    trainer = Trainer(module.model, module.guide, module, loss or Trace_ELBO(), optim, train_data=_data(),
                      batch_size=BATCH, epochs=epochs, seed=5, device="cpu", out_dir=out, extras=[critic],
                      progress=False, clip_norm=3.0, transform=transform)
    return trainer, module, critic


def _weights(module: nn.Module, critic: _Critic) -> dict[str, torch.Tensor]:
    return {**{k: v.clone() for k, v in module.state_dict().items()},
            **{f"critic.{k}": v.clone() for k, v in critic.module.state_dict().items()}}


def _refuse_writes(path):
    raise AssertionError(f"a process other than rank 0 wrote {path}")


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    if rank != 0:
        checkpoint._open_temp = _refuse_writes  # every file is written through atomic_write
    root_path = Path(root)
    results = {}
    for mode in ("svi", "diff", "tracegraph"):
        loss = TraceGraph_ELBO() if mode == "tracegraph" else None  # no differentiable_loss: no DDP
        trainer, module, critic = _trainer(root_path / f"step-{mode}", "svi" if loss else mode,
                                           stochastic=False, epochs=1, loss=loss)
        if mode == "diff":
            results["noise"] = torch.rand(4)  # the global RNG right after the Trainer seeded it
        trainer.fit()
        results[mode] = _weights(module, critic)
        results[f"{mode}-ddp"] = trainer.data_parallel
    # Exact resume: two epochs straight, against one epoch and a resumed second, both two processes.
    trainer, module, critic = _trainer(root_path / "straight", "svi", stochastic=True, epochs=2)
    trainer.fit()
    results["straight"] = _weights(module, critic)
    _trainer(root_path / "resumed", "svi", stochastic=True, epochs=1)[0].fit()
    trainer, module, critic = _trainer(root_path / "resumed", "svi", stochastic=True, epochs=2)
    trainer.fit(resume=True)
    results["resumed"] = _weights(module, critic)
    # Variational walkback online: one walk length per minibatch on every process (else the processes run
    # different numbers of steps and collectives), p*'s moments from the whole minibatch.
    from experiments.walkback import walk_transform
    from inference.walkback import OnlineWalkbackELBO, PStarMoments
    from ppl_models.walkback import VariationalWalkback

    torch.manual_seed(0)
    pair = VariationalWalkback(4, form="gaussian", hidden=(8,), t_max=16.0, max_extra=3)
    walks = []
    base = walk_transform(pair, None)

    def transform(x, g):
        x = base(x, g)
        walks.append(pair.walk_steps)
        return x

    data = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    walkback = Trainer(pair.model, pair.guide, pair, OnlineWalkbackELBO(pair), pyro.optim.Adam({"lr": 1e-3}),
                       train_data=data, batch_size=8, epochs=1, seed=0, device="cpu",
                       out_dir=root_path / "walkback", extras=[PStarMoments(pair)], progress=False,
                       transform=transform)
    walkback.fit()
    results["walkback-ddp"] = walkback.data_parallel
    results["walks"] = walks
    results["walkback"] = {k: v.clone() for k, v in pair.state_dict().items()}
    # Sharded scoring: each process scores its rows (7 bound rows, 5 IWAE rows: uneven shards), every
    # process gets all rows back in order. The exact guide makes every IWAE value exactly log p(x).
    import functools

    from inference.scoring import score_bound_and_iwae
    from ppl_models.linear_gaussian import LinearGaussianChain

    chain = LinearGaussianChain(latent_dim=2, obs_dim=3, num_steps=2, seed=0)
    x = chain.sample(7)
    s = score_bound_and_iwae(chain.model, functools.partial(chain.guide, params=chain.exact_guide_params()),
                             x, bound_draws=400, iw_samples=8, iw_limit=5, batch_size=2, iw_batch=2)
    results["scores"] = {"bound": s.bound, "iwae": s.iwae, "khat": torch.as_tensor(s.estimate.khat),
                         "ess": s.estimate.ess, "exact": -chain.exact_log_marginal(x)}
    torch.save(results, root_path / f"rank{rank}.pt")  # not through atomic_write: every rank reports
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(2, _free_port(), str(root)), nprocs=2, join=True, start_method="spawn")
    return root, [torch.load(root / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("mode", ["svi", "diff", "tracegraph"])
def test_two_process_step_equals_single_process_step_on_the_whole_minibatch(two_process_run, tmp_path, mode):
    _, ranks = two_process_run
    # Through DistributedDataParallel in both modes; a loss without differentiable_loss sums explicitly.
    assert all(got[f"{mode}-ddp"] == (mode != "tracegraph") for got in ranks)
    loss = TraceGraph_ELBO() if mode == "tracegraph" else None
    trainer, module, critic = _trainer(tmp_path, "svi" if loss else mode, stochastic=False, epochs=1,
                                       loss=loss)
    trainer.fit()  # no process group: the single-process run, two steps of 8
    assert not trainer.data_parallel
    single = _weights(module, critic)
    for got in ranks:  # both processes hold the same weights, those of the single-process run
        for name, value in single.items():
            assert torch.allclose(got[mode][name], value, rtol=1e-10, atol=1e-12), name
    # The weights moved: the comparison is not of untouched initial values.
    torch.manual_seed(0)
    initial = _AutoEncoder(False).double().state_dict()
    assert not torch.allclose(single["dec.weight"], initial["dec.weight"])


def test_only_rank_zero_writes_and_metrics_are_the_minibatch_s(two_process_run, tmp_path):
    root, _ = two_process_run  # rank 1 would have failed on any write (see _worker)
    lines = (root / "step-svi" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    trainer, _, _ = _trainer(tmp_path, "svi", stochastic=False, epochs=1)
    trainer.fit()
    single = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert json.loads(lines[0])["train_loss"] == pytest.approx(single["train_loss"], rel=1e-10)
    assert (root / "step-svi" / "checkpoint.pt").is_file()


def test_two_process_resume_continues_exactly(two_process_run):
    _, ranks = two_process_run
    for got in ranks:
        for name, value in got["straight"].items():
            assert torch.equal(got["resumed"][name], value), name
    # The processes hold the same weights, having drawn different noise.
    assert all(torch.equal(ranks[0]["straight"][k], ranks[1]["straight"][k]) for k in ranks[0]["straight"])


def test_processes_draw_their_own_noise_and_rank_zero_the_single_process_s(two_process_run, tmp_path):
    _, ranks = two_process_run
    assert not torch.equal(ranks[0]["noise"], ranks[1]["noise"])
    _trainer(tmp_path, "diff", stochastic=False, epochs=1)
    assert torch.equal(torch.rand(4), ranks[0]["noise"])


def test_walkback_runs_one_walk_length_and_one_p_star_on_every_process(two_process_run):
    _, ranks = two_process_run
    assert not ranks[0]["walkback-ddp"]  # an online loss sums each term's gradients itself
    assert ranks[0]["walks"] == ranks[1]["walks"] and len(set(ranks[0]["walks"])) > 1  # K varied, alike
    for name, value in ranks[0]["walkback"].items():  # weights and p*'s moments agree
        assert torch.equal(ranks[1]["walkback"][name], value), name


def test_scoring_is_sharded_and_every_process_gets_every_row_in_order(two_process_run):
    _, ranks = two_process_run
    for got in ranks:
        sc = got["scores"]
        assert sc["bound"].shape == (7,) and sc["iwae"].shape == (5,) and sc["ess"].shape == (5,)
        assert len(sc["khat"]) == 5
        # Exact guide: each IWAE value is its row's -log p(x), to float64 rounding, in row order.
        assert torch.allclose(sc["iwae"], sc["exact"][:5], rtol=0, atol=1e-8)
        # The bound: the mean of 400 single paths per row, an upper bound equal to -log p(x) in
        # expectation (the exact guide); single paths vary by about a nat, so 400 give about 0.05.
        assert torch.allclose(sc["bound"], sc["exact"], rtol=0, atol=0.3)
    assert torch.equal(ranks[0]["scores"]["bound"], ranks[1]["scores"]["bound"])


def test_checkpoint_of_two_processes_is_refused_by_one(two_process_run, tmp_path):
    root, _ = two_process_run
    trainer, _, _ = _trainer(root / "straight", "svi", stochastic=True, epochs=3)
    with pytest.raises(ValueError, match="written by 2 process"):
        trainer.fit(resume=True)


def test_shards_must_not_be_empty(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    module = _AutoEncoder(False).double()
    with pytest.raises(ValueError, match="4 processes need at least 4 examples in every minibatch"):
        Trainer(module.model, module.guide, module, Trace_ELBO(), pyro.optim.Adam({"lr": 0.1}),
                train_data=torch.zeros(10, D, dtype=torch.float64), batch_size=8, epochs=1, seed=0,
                device="cpu", out_dir=tmp_path, progress=False)


def test_outside_a_process_group_nothing_changes():
    idx = torch.arange(10)
    assert torch.equal(distributed.shard(idx), idx)
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_writer()
    assert distributed.rank_seed(7) == 7
    assert distributed.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]


def test_torchrun_runs_an_experiment_once(tmp_path):
    """``torchrun --nproc_per_node 2 -m experiments.vae``: one run, its files written once, the process
    count recorded in the configuration (and required of a resume)."""
    import subprocess
    import sys

    out = tmp_path / "vae"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "experiments.vae", "--preset", "quick", "--set", "train.epochs=2", "--set",
           "eval.iw_samples=20", "--set", "eval.bound_draws=2", "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["processes"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "results.json").read_text())["config"]["processes"] == 2
    assert done.stdout.count("## Configuration that ran") == 1  # the summary page printed once
    single = subprocess.run([sys.executable, "-m", "experiments.vae", "--preset", "quick", "--set",
                             "train.epochs=2", "--out", str(out), "--resume"], env=env, capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert single.returncode == 2 and "processes: run 2" in single.stderr
