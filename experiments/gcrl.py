"""The goal-conditioned RL generator against a convolutional VAE and the diffusion model: Table 1, Fig. 2-3.

    python -m experiments.gcrl --preset quick       # scikit-learn digits, minutes on a CPU (no diffusion row)
    python -m experiments.gcrl --preset cpu         # Fashion-MNIST, about two hours on 2 cores
    python -m experiments.gcrl --preset paper --device cuda

Paper: Vargas Vieyra & Ménard, "Learning generative models with goal-conditioned reinforcement learning":
Sec. 3 (the agents, Alg. 1-3), Sec. 4 (Table 1, Fig. 2-3), App. B (networks).

Protocol (stated in every output): grey levels in [0, 1], not binarised; the data set's train / valid /
test split. The GC-RL generator is trained by Alg. 1-2 (:mod:`inference.gcrl`) and evaluated at its last
epoch; the convolutional VAE (:class:`ppl_models.conv_vae.ConvVAE`) by the path-wise KL ELBO, evaluated at
its best validation epoch; the diffusion model is the committed run named in the preset (not retrained).
Table 1's columns: the MSE per pixel between test images and their reconstructions (GC-RL: the greedy
GC-agent's final state; VAE: the decoder mean at the encoder mean; both clipped to [0, 1]); FD-classifier of
the reconstructions against the same test images; FD-classifier of samples against the training and the
test images (Fréchet distance in the features of the project's classifier trained on the same data, never
Inception features, so only the paper's ranks carry over). The bound: Eq. 2 in nats per image (a continuous
Gaussian density on grey levels with σ² fit on training images), for the greedy GC-agent (a Dirac guide,
whose IWAE-K equals its bound) and for the Boltzmann guide at each temperature τ, with IWAE-K; the VAE's
bound and IWAE-K on the same images and density kind beside it. The diffusion model's likelihood is a
discrete one on 8-bit levels: not comparable, not shown.

Outputs in ``--out``: results.json / results.md; agent/ and vae/ (the Trainer's checkpoint and
metrics.jsonl, the evaluated weights final.pt and result.json, which ``experiments.sample --run`` loads);
trajectories.png (Fig. 2), reconstructions.png and samples_<method>.png (Fig. 3), curves.png.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import Trace_ELBO

from experiments.common import batched, build_registered, train_best, write_form_run
from experiments.data import Dataset, load_dataset
from experiments.report import markdown_table, save_curves, save_image_grid, write_report
from experiments.runner import Experiment, RunContext
from inference.fd_classifier import classifier_features, fd_against_features, load_fd_classifier
from inference.gcrl import GCAgentUpdate, Replay, SAgentUpdate
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from inference.sample_quality import reconstruction_mse
from inference.scoring import nll_summary, score_bound_and_iwae
from inference.train import Trainer
from ppl_models.conv_vae import ConvVAE
from ppl_models.gcrl import GCRLGenerator

EXPERIMENT = "gcrl"
DEFAULT_OUT = "runs/gcrl"


def bound_per_image(pair: Any, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """−ELBO per image (one guide path each), float64 on the CPU."""
    elbo = PathwiseKL_ELBO()
    with torch.no_grad():
        return torch.cat(batched(lambda v: -elbo.per_datum(pair.model, pair.guide, v), x,
                                 batch_size=batch_size)).double().cpu()


def train_agent(pair: GCRLGenerator, config: dict[str, Any], data: Dataset, out: Path, device: str,
                resume: bool, progress: bool) -> dict[str, Any]:
    """Alg. 1-2 on the Trainer; after each epoch σ² is fit on training images and the bound computed on
    validation images. The last epoch's weights are evaluated (the GC-agent and the replay are the hook's
    state, which a best-epoch copy of the S-agent would not match)."""
    t = config["train"]
    pair.to(device)  # the MDP's buffers (rates, x_1) belong to neither network the Trainer moves
    train = data.train[: t["max_train"] or None].to(device)
    replay = Replay(pair.x_dim, pair.steps, t["capacity"], t["trajectory_capacity"]).to(device)
    loss = SAgentUpdate(pair, train, replay, t["loss_scale"])
    hook = GCAgentUpdate(pair, loss, t["lr"], t["rho"], t["batch_size"])
    valid = data.valid[: t["valid_limit"]].to(device)
    fit_on = train[: t["sigma2_images"]]
    batch = config["eval"]["batch_size"]

    def evaluate(epoch: int) -> dict[str, float]:
        sigma2 = pair.fit_sigma2(fit_on, batch)
        return {"valid_bound": -float(bound_per_image(pair, valid, batch).mean()), "sigma2": sigma2}

    trainer = Trainer(pair.model, pair.guide, pair.s_agent, loss, lambda ps: torch.optim.Adam(ps, lr=t["lr"]),
                      (train, torch.arange(train.shape[0], device=device)), t["batch_size"], t["epochs"],
                      config["seed"], device, out, evaluate=evaluate, extras=[hook], progress=progress)
    metrics = trainer.fit(resume=resume)
    sigma2 = pair.fit_sigma2(fit_on, batch)
    return {"epochs": len(metrics), "updates": trainer.step, "goals": int(train.shape[0]), "sigma2": sigma2,
            "metrics": metrics}


def train_vae(config: dict[str, Any], data: Dataset, out: Path, device: str, resume: bool,
              progress: bool) -> tuple[ConvVAE, dict[str, Any]]:
    vae = build_registered("conv-vae", config["vae"], data.train.shape[1], image_shape=data.image_shape)
    vae = vae.to(device)
    elbo = Trace_ELBO()

    def batch_nll(x: torch.Tensor) -> torch.Tensor:
        vae.eval()  # batch norm: running statistics for scoring, batch statistics for training
        value = elbo.loss(vae.model, vae.guide, x)
        vae.train()
        return torch.tensor(value)

    sub = {"seed": config["seed"], "train": config["train_vae"], "eval": config["eval"]}
    valid = data.valid[: config["train_vae"]["valid_limit"]].to(device)
    fit = train_best(vae, elbo, batch_nll, sub, data.train.to(device), None, (valid,), out, device, resume,
                     progress)
    vae.eval()
    return vae, {k: fit[k] for k in ("epochs", "evaluated_epoch", "valid_nll", "updates", "metrics")}


def bounds(method: Any, x: torch.Tensor, ev: dict[str, Any], tau: float | None = None) -> dict[str, Any]:
    """The bound and IWAE-K per image (nats) on ``x``; ``tau``: the GC-RL guide's temperature."""
    if tau is not None:
        method.tau = tau
    if tau == 0:  # a Dirac guide: every importance sample is the same path, IWAE-K = the bound
        nll = bound_per_image(method, x, ev["batch_size"])
        return {"tau": 0.0, "bound": nll_summary(nll), "iwae": None}
    s = score_bound_and_iwae(method.model, method.guide, x, bound_draws=1, iw_samples=ev["iw_samples"],
                             batch_size=ev["batch_size"], iw_batch=max(1, ev["batch_size"] // 10))
    iwae = {**nll_summary(s.iwae), **s.estimate.summary()}
    return {"tau": tau, "bound": nll_summary(s.bound), "iwae": iwae}


def run(config: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    data = load_dataset(config["dataset"], ctx.data_dir)
    device, ev = ctx.device, config["eval"]
    shape = tuple(data.image_shape)
    test = data.test[: config["eval_limit"]] if config["eval_limit"] else data.test
    pyro.set_rng_seed(config["seed"])  # the networks' initial weights: a fresh run is reproducible
    pair = build_registered("gcrl", config["agent"], data.train.shape[1], image_shape=shape).to(device)
    t0 = time.time()
    # Each stage resumes where it has a checkpoint: a run stopped during the agent's training has none for
    # the VAE yet.
    agent_fit = train_agent(pair, config, data, ctx.out / "agent", device,
                            ctx.resume and (ctx.out / "agent" / "checkpoint.pt").is_file(), ctx.progress)
    agent_fit["seconds_this_process"] = time.time() - t0
    t0 = time.time()
    vae, vae_fit = train_vae(config, data, ctx.out / "vae", device,
                             ctx.resume and (ctx.out / "vae" / "checkpoint.pt").is_file(), ctx.progress)
    vae_fit["seconds_this_process"] = time.time() - t0
    pair.eval()

    classifier = load_fd_classifier(config["dataset"], device=device)
    reference = {s: classifier_features(classifier, getattr(data, s)[: ev["fd_reference"]])
                 for s in ("train", "test")}
    goals = test[: ev["recon_images"] or None].to(device)
    goal_features = {"test": classifier_features(classifier, goals)}
    recon = {"gcrl": torch.cat(batched(lambda g: pair.rollout(g)["states"][-1].clamp(0, 1), goals,
                                       batch_size=ev["batch_size"])),
             "vae": torch.cat(batched(vae.reconstruct, goals, batch_size=ev["batch_size"]))}
    torch.manual_seed(config["seed"] + 1)
    n = ev["fd_samples"]
    samplers = {"gcrl": pair.sample, "vae": vae.sample}
    steps = {"gcrl": pair.steps, "vae": 1}
    diffusion, trained_steps = None, None
    if config["diffusion"]["run"]:
        diffusion = load_diffusion(config, device)
        samplers["diffusion"] = lambda k: diffusion.sample(k, config["diffusion"]["sample_steps"])
        steps["diffusion"] = len(diffusion.strides(config["diffusion"]["sample_steps"]))
        trained_steps = diffusion.num_steps
    methods: dict[str, Any] = {}
    samples: dict[str, torch.Tensor] = {}
    for name, draw in samplers.items():
        t0 = time.time()
        samples[name] = torch.cat([draw(min(ev["batch_size"], n - i)) for i in range(0, n, ev["batch_size"])])
        entry: dict[str, Any] = {"sampling_steps": steps[name], "sample_seconds": time.time() - t0,
                                 "fd_samples": fd_against_features(classifier, samples[name], reference),
                                 "num_samples": n}
        if name == "diffusion":  # the model's own ancestral sampler takes all T steps; ours may stride
            entry["trained_steps"] = trained_steps
        if name in recon:
            entry["mse"] = reconstruction_mse(recon[name].cpu(), goals.cpu())
            entry["fd_reconstructions"] = fd_against_features(classifier, recon[name], goal_features)["test"]
        methods[name] = entry

    x = test[: ev["bound_images"]].to(device)
    torch.manual_seed(config["seed"] + 2)
    bound_rows = [{"method": "gcrl", **bounds(pair, x, ev, 0.0)}]
    bound_rows += [{"method": "gcrl", **bounds(pair, x, ev, tau)} for tau in ev["taus"]]
    pair.tau = 0.0
    bound_rows.append({"method": "vae", **bounds(vae, x, ev)})

    figures(pair, vae, goals, recon, samples, shape, ev, agent_fit["metrics"], ctx.out)
    # the evaluated weights of both trained models, for experiments.sample and experiments.runs.load_run
    write_form_run(ctx.out / "agent", EXPERIMENT, "gcrl", config, config["agent"], pair, methods["gcrl"])
    write_form_run(ctx.out / "vae", EXPERIMENT, "vae", config, config["vae"], vae, methods["vae"])
    out = {"experiment": EXPERIMENT, "config": config, "data": data.describe(), "device": device,
           "torch": torch.__version__, "agent": agent_fit, "vae": vae_fit, "methods": methods,
           "bounds": bound_rows,
           "test_images": {"reconstructions": int(goals.shape[0]), "bound": int(x.shape[0])},
           "diffusion_run": config["diffusion"]["run"]}
    write_report(ctx.out, "results", out, render_markdown(out), config=config, command=ctx.command)
    return out


def load_diffusion(config: dict[str, Any], device: str) -> Any:
    """The committed diffusion run of the preset, checked to be a Gaussian form of the same data set."""
    from experiments.runs import load_run

    run = load_run(config["diffusion"]["run"], device)
    if run.model_name != "diffusion-gaussian" or run.dataset != config["dataset"]:
        raise ValueError(f"diffusion.run {config['diffusion']['run']!r} holds {run.model_name} on "
                         f"{run.dataset}; the baseline must be a diffusion-gaussian run on "
                         f"{config['dataset']}")
    return run.module


def figures(pair: GCRLGenerator, vae: ConvVAE, goals: torch.Tensor, recon: dict[str, torch.Tensor],
            samples: dict[str, torch.Tensor], shape: tuple[int, int], ev: dict[str, Any],
            metrics: list[dict[str, Any]], out: Path) -> None:
    k = ev["trajectories"]
    # Fig. 2: k S-agent trajectories from the same (zero) start; row = trajectory, column = x_2 .. x_{H+1}
    path = pair.sample_path(k)["states"][1:].clamp(0, 1)  # (H, k, D)
    save_image_grid(path.transpose(0, 1).reshape(-1, pair.x_dim), shape, out / "trajectories.png",
                    ncol=pair.steps, title=f"Fig. 2: {k} S-agent trajectories from x_1 = 0 (states x_2 .. "
                    f"x_{{H+1}}, H = {pair.steps}; the selections are the only randomness)")
    m = min(8, goals.shape[0])
    grid = torch.cat([goals[:m], recon["gcrl"][:m], recon["vae"][:m]])
    save_image_grid(grid, shape, out / "reconstructions.png", ncol=m,
                    title="Fig. 3: test images (row 1), GC-RL reconstructions (greedy GC-agent, row 2), "
                          "convolutional VAE reconstructions (row 3)")
    for name, s in samples.items():
        save_image_grid(s[:64], shape, out / f"samples_{name}.png",
                        title=f"Fig. 3: samples of {name} (the first 64 of those scored)")
    save_curves(metrics, ["gcrl/reconstruction_mse"], out / "curves.png", ylabel="MSE per pixel",
                title="GC-RL training: reconstruction MSE (left); Q-loss and entropies in nats (right)",
                secondary=["gcrl/q_loss", "gcrl/select_entropy", "gcrl/usage_entropy"],
                secondary_label="Q-loss / entropy (nats)")


def render_markdown(r: dict[str, Any]) -> str:
    c, m = r["config"], r["methods"]
    names = {"gcrl": "GC-RL generator (ours)", "vae": "convolutional VAE", "diffusion": "diffusion model"}

    def fd(v: Any) -> str:
        return "–" if v is None else f"{v:.2f}"

    def steps(e: dict[str, Any]) -> str:
        if "trained_steps" not in e or e["trained_steps"] == e["sampling_steps"]:
            return str(e["sampling_steps"])
        t = e["trained_steps"]
        return f"{e['sampling_steps']} (strided DDIM; ancestral sampling of this T = {t} model: {t})"

    rows = [[names[k], "–" if "mse" not in e else f"{e['mse']:.4f}", fd(e.get("fd_reconstructions")),
             fd(e["fd_samples"]["train"]), fd(e["fd_samples"]["test"]), steps(e)] for k, e in m.items()]
    header = ["method", "MSE rec. ↓", "FD-classifier rec. ↓", "FD-classifier samples vs train ↓",
              "FD-classifier samples vs test ↓", "network steps per sample"]
    brows = []
    for b in r["bounds"]:
        who = names[b["method"]]
        if b["method"] == "gcrl":
            who += " — greedy GC-agent" if b["tau"] == 0 else f" — Boltzmann guide, τ = {b['tau']}"
        iw = b["iwae"]
        brows.append([who, f"{b['bound']['nll']:.2f} ± {b['bound']['stderr']:.2f}",
                      "= bound (a Dirac guide)" if iw is None else f"{iw['nll']:.2f} ± {iw['stderr']:.2f}",
                      "–" if iw is None else f"{iw['ess_mean']:.1f}",
                      "–" if iw is None else
                      f"{iw['khat_frac_gt_0.7']:.2f} / {iw['khat_frac_degenerate']:.2f}"])
    a = r["agent"]
    t = r["test_images"]
    ag = c["agent"]
    dm = "no diffusion row in this preset"
    if "diffusion" in m:
        dm = (f"the committed run `{r['diffusion_run']}` (not retrained), sampled with "
              f"{m['diffusion']['sampling_steps']} steps")
    return "\n".join([
        f"# Goal-conditioned RL generator, convolutional VAE and diffusion model — preset `{c['preset']}`",
        "",
        f"Data: {c['dataset']} grey levels in [0, 1] (not binarised), its train / valid / test split; "
        f"reconstructions of the first {t['reconstructions']} test images; {m['gcrl']['num_samples']} "
        f"samples per method, FD-classifier against the first {c['eval']['fd_reference']} training and test "
        f"images (Fréchet distance in the features of the project's classifier trained on "
        f"{c['dataset']}, not Inception features: not comparable in value with the paper's FID, only in "
        "rank).", "",
        markdown_table(header, rows), "",
        f"GC-RL: H = {ag['steps']}, A = {ag['actions']}, κ = {ag['kappa']}, ρ = {c['train']['rho']}, Adam lr "
        f"{c['train']['lr']}; {a['updates']} updates over {a['epochs']} epochs of {a['goals']} goals; the "
        f"last epoch is evaluated; σ² = {a['sigma2']:.4g} (fit on training images). VAE: best validation "
        f"epoch {r['vae']['evaluated_epoch']} of {r['vae']['epochs']}. Diffusion: {dm}.", "",
        f"## The bound of Eq. 2 (nats per image, first {t['bound']} test images)", "",
        "A Gaussian density on grey levels (continuous): never compare it with a bound on binarised images. "
        "The bound is an upper bound on −log p(x); IWAE-K is an estimate (also an upper bound in "
        "expectation); ± is the standard error over images.", "",
        markdown_table(["model / guide", "−ELBO (bound) ↓", f"IWAE-{c['eval']['iw_samples']} ↓",
                        "mean ESS", "fraction k-hat > 0.7 / degenerate tail"], brows), "",
        "Paper (Vargas Vieyra & Ménard, Table 1, Fashion-MNIST, Inception FID): MSE rec. .10 (ours) vs .13 "
        "(VAE); FID rec. 39.10 vs 45.09; FID samples 47.74 vs 60.06 (VAE) and 9.63 (diffusion, 1000 steps); "
        "only ranks carry over.", ""])


GCRL_EXPERIMENT = Experiment(name=EXPERIMENT, prog="python -m experiments.gcrl", description=__doc__,
                             default_out=DEFAULT_OUT, run=run, summary=(("results.md", "results.json"),),
                             # the evaluation's sizes change no training: a finished run may be re-scored
                             resumable=("eval.",))


def main(argv: list[str] | None = None) -> int:
    return GCRL_EXPERIMENT.main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
