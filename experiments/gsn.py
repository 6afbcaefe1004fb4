"""Variational simple GSNs with collaborative shaping: ORK vs VAR; guided unrolled chains vs the one-step VAE.

Bachman & Precup (2015), "Variational generative stochastic networks with collaborative shaping", Sec. 5-7,
Fig. 3-4, on grey-level images in [0, 1] (no binarisation; a Bernoulli p(x|z) scores grey levels with the
cross-entropy, a Gaussian one is a density on them)::

    python -m experiments.gsn --preset quick        # scikit-learn 8x8 digits, a few minutes on a CPU
    python -m experiments.gsn --preset cpu          # Fashion-MNIST, sized for a 2-core CPU
    python -m experiments.gsn --preset paper --device cuda

What runs. For each objective named by the variants (``var``: the free energy of Eq. 2; ``ork``: Eq. 5), a
chain (:class:`ppl_models.gsn_chain.GSNChain`) is pre-trained as a VAE (the chain run one step, Fig. 1(c)),
in ``pretrain-<objective>/``. Each variant ``<objective>-<phase>`` is then forked from that model and trained
further in ``<variant>/``: ``guided`` unrolls the chain ``unroll.steps`` steps with the guide function's L_g
back-propagated through it (:class:`inference.collaborative.CollaborativeShaping`; the free energies too
where ``unroll.bptt``), ``unrolled`` is the same without the guide function (the ablation that says what f
adds), ``onestep`` keeps training the VAE (the "one-step VAE" of Fig. 3), ``walkback`` walks
``unroll.steps`` steps and reconstructs the data at each (Alg. 1). Both phases train a fixed number of
updates (Adam; the paper used plain SGD) and the last weights are evaluated.

Evaluated per variant: the one-step variational bound F(x) of Eq. 2 on the test split (a bound) and IWAE-K
(an estimate); the Gaussian Parzen-window log-likelihood of the test split (σ from the validation split);
FD-classifier of prior samples against the training and the test split; the entropy of the classifier's
predicted classes (mode coverage); reconstruction MSE; and the chain-drift test (Fig. 3): FD-classifier
against the test split of the chains' emitted means at the steps ``eval.chain_steps``, from training images.
Figures: long-run free chains (every ``figure_every``-th sample, Fig. 4a left), partial-control chains
(Fig. 4a right), Parzen and bound curves over training (Fig. 4b), the reconstruction-vs-KL scatter (Fig. 4c),
prior samples and mode coverage. Outputs in ``--out``: results.json, results.md, the PNGs, and one
sub-directory per training stage (checkpoint.pt, metrics.jsonl) so that ``--resume`` continues any stage;
each variant's directory also holds its evaluated weights (final.pt) and result.json, which
``experiments.runs.load_run`` and ``python -m experiments.sample --run DIR`` load.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch

from experiments.common import build_registered, train_best
from experiments.data import IMAGE_SHAPES, Dataset, load_dataset
from experiments.report import fmt_or_na, markdown_table, save_image_grid, write_json, write_report
from experiments.runner import Experiment, RunContext
from inference.checkpoint import save_figure
from inference.collaborative import CollaborativeShaping
from inference.fd_classifier import (
    CLASSIFIERS,
    FDClassifier,
    classifier_features,
    fd_against_features,
    load_fd_classifier,
    mode_coverage,
    save_mode_coverage_figure,
)
from inference.ork_elbo import OverRegularisedKL_ELBO
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from inference.sample_quality import (
    parzen_log_likelihood,
    parzen_score,
    reconstruction_mse,
    select_parzen_sigma,
)
from inference.scoring import nll_summary, score_bound_and_iwae
from inference.train import load_checkpoint, save_checkpoint
from ppl_models.gsn_chain import GSNChain
from ppl_models.masks import make_mask_process

EXPERIMENT = "gsn"
DEFAULT_OUT = "runs/gsn"
OBJECTIVES = ("var", "ork")
PHASES = ("guided", "unrolled", "onestep", "walkback")
#: Each variant's evaluated weights, which experiments.runs.load_run loads.
FINAL_WEIGHTS = "final.pt"
#: The value the hidden pixels of a partial-control chain start at.
FILL = 0.5
#: The paper's MNIST numbers (Sec. 7), quoted beside — never inside — our Fashion-MNIST tables.
PAPER_MNIST = "MNIST, Gaussian Parzen test log-likelihood (Sec. 7): ORK 265, VAR 220 (nats)"


def parse_variant(name: str) -> tuple[str, str]:
    """(objective, phase) of a variant name such as ``ork-guided``; an error lists the allowed names."""
    objective, _, phase = name.partition("-")
    if objective not in OBJECTIVES or phase not in PHASES:
        allowed = [f"{o}-{p}" for o in OBJECTIVES for p in PHASES]
        raise ValueError(f"unknown variant {name!r}; allowed: {allowed}")
    return objective, phase


def prepare(config: dict[str, Any], args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        for v in config["variants"]:
            parse_variant(v)
        make_mask_process(config["eval"]["partial_mask"], IMAGE_SHAPES[config["dataset"]])
    except ValueError as e:
        parser.error(str(e))
    if not config["variants"]:
        parser.error("variants is empty: name at least one, e.g. --set variants=[var-guided]")
    ev = config["eval"]
    if ev["fd_samples"] > ev["parzen_samples"]:
        parser.error(f"eval.fd_samples = {ev['fd_samples']} must be <= eval.parzen_samples = "
                     f"{ev['parzen_samples']}: the FD samples are the first of the Parzen centres")


# ------------------------------------------------------------------------------------------- training


def objective(kind: str, config: dict[str, Any], q_samples: int) -> PathwiseKL_ELBO:
    """The training objective of ``kind``: VAR (Eq. 2, path-wise KL) or ORK (Eq. 5), ``q_samples`` draws of q
    per example as vectorised particles."""
    common = {"num_particles": q_samples, "vectorize_particles": q_samples > 1, "max_plate_nesting": 1}
    if kind == "ork":
        return OverRegularisedKL_ELBO(kl_weight=config["ork"]["kl_weight"], penalty=config["ork"]["penalty"],
                                      **common)
    return PathwiseKL_ELBO(**common)


def build_chain(config: dict[str, Any], x_dim: int, num_steps: int, walkback: bool,
                bptt: bool = True) -> GSNChain:
    return build_registered("gsn-chain", config["model"], x_dim, num_steps=num_steps, walkback=walkback,
                            bptt=bptt)


def one_step(chain: GSNChain) -> tuple[Any, Any]:
    """The one-step model and guide: the VAE whose free energy F(x) (Eq. 2) bounds −log p(x)."""
    return functools.partial(chain.model, num_steps=1), functools.partial(chain.guide, num_steps=1)


def curve_metrics(chain: GSNChain, data: Dataset, ev: dict[str, Any], every: int,
                  last: int) -> Callable[[int], dict[str, Any]]:
    """evaluate_more for train_best: every ``every`` epochs (and the last), a validation Parzen estimate (σ
    chosen on the first half of the first ``curve_valid`` validation images, scored on the second half) and
    the mean reconstruction cost and KL of ``scatter_points`` validation images (10 draws each), with the
    per-image values for the Fig. 4(c) scatter."""
    n = min(ev["curve_valid"], data.valid.shape[0])
    pick, score = data.valid[: n // 2], data.valid[n // 2 : n]
    scatter = data.valid[: ev["scatter_points"]]

    def more(epoch: int) -> dict[str, Any]:
        if epoch % every and epoch != last:
            return {}
        with torch.no_grad():
            centres = chain.sample(ev["curve_parzen_samples"])
            sigma, _ = select_parzen_sigma(centres, pick, ev["parzen_grid"])
            parzen = float(parzen_log_likelihood(centres, score, sigma).mean())
            rec, kl = chain.reconstruction_and_kl(scatter)
        return {"valid_parzen": parzen, "valid_parzen_sigma": sigma, "valid_rec": float(rec.mean()),
                "valid_kl": float(kl.mean()), "scatter_rec": rec.tolist(), "scatter_kl": kl.tolist()}

    return more


def train_stage(chain: GSNChain, kind: str, section: dict[str, Any], config: dict[str, Any], data: Dataset,
                out: Path, ctx: RunContext, extras: tuple = ()) -> dict[str, Any]:
    """Train one stage (pre-training or a fork) in ``out`` for a fixed number of updates; resumes a stage
    that has a checkpoint when the run is resumed."""
    out.mkdir(parents=True, exist_ok=True)
    ev = config["eval"]
    valid = data.valid[: section["valid_limit"]]
    bound = PathwiseKL_ELBO()
    model, guide = one_step(chain)
    resume = ctx.resume and (out / "checkpoint.pt").is_file()
    stage_config = {"train": section, "eval": ev, "seed": config["seed"]}
    return train_best(chain, objective(kind, config, section["q_samples"]),
                      lambda x: -bound.per_datum(model, guide, x).sum(), stage_config, data.train, None,
                      (valid,), out, ctx.device, resume, ctx.progress, extras=extras,
                      evaluate_more=curve_metrics(chain, data, ev, ev["curve_every"], section["epochs"]),
                      use_best=False)


def train_variants(config: dict[str, Any], data: Dataset, ctx: RunContext) -> dict[str, dict[str, Any]]:
    """Pre-train one VAE per objective, fork every variant from it and train it; returns per variant its
    chain (last weights) and the metrics of both stages."""
    x_dim, seed = data.train.shape[1], config["seed"]
    pre: dict[str, tuple[dict[str, Any], Path]] = {}
    trained = {}
    for name in config["variants"]:
        kind, phase = parse_variant(name)
        if kind not in pre:
            pyro.set_rng_seed(seed)
            chain = build_chain(config, x_dim, 1, False)
            stage = ctx.out / f"pretrain-{kind}"
            pre[kind] = (train_stage(chain, kind, config["pretrain"], config, data, stage, ctx), stage)
        fit_pre, stage = pre[kind]
        pyro.set_rng_seed(seed + 1)
        steps = 1 if phase == "onestep" else config["unroll"]["steps"]  # guided, unrolled, walkback: T
        chain = build_chain(config, x_dim, steps, phase == "walkback", config["unroll"]["bptt"])
        chain.load_state_dict(load_checkpoint(stage / "checkpoint.pt")["module"])  # the fork
        extras: tuple = ()
        if phase == "guided":
            g = config["guide_f"]
            extras = (CollaborativeShaping(chain, x_dim, hidden=g["hidden"], pieces=g["pieces"],
                                           bound=g["bound"], lr=g["lr"], lg_weight=g["lg_weight"],
                                           f_penalty=g["f_penalty"], linear=g["linear"],
                                           quadratic=g["quadratic"]),)
        t0 = time.time()
        fit = train_stage(chain, kind, config["unroll"], config, data, ctx.out / name, ctx, extras)
        chain.eval()
        trained[name] = {"chain": chain, "pretrain": fit_pre, "fork": fit, "seconds": time.time() - t0}
    return trained


# ----------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_variant(chain: GSNChain, data: Dataset, config: dict[str, Any], classifier: FDClassifier,
                     reference_features: dict[str, torch.Tensor], test: torch.Tensor,
                     progress: bool) -> dict[str, Any]:
    ev = config["eval"]
    model, guide = one_step(chain)
    s = score_bound_and_iwae(model, guide, test, bound_draws=ev["bound_draws"], iw_samples=ev["iw_samples"],
                             iw_limit=ev["iw_limit"], batch_size=ev["batch_size"], iw_batch=ev["iw_batch"],
                             iw_chunk=ev["iw_chunk"], progress=progress)
    centres = chain.sample(ev["parzen_samples"])
    samples = centres[: ev["fd_samples"]]  # prepare() checks fd_samples <= parzen_samples
    loc, _ = chain.encode(test)
    steps = sorted(set(ev["chain_steps"]))
    starts = data.train[torch.randperm(data.train.shape[0], generator=torch.Generator().manual_seed(0))
                        [: ev["chain_starts"]].to(data.train.device)]
    frames = chain.run_chain(starts, max(steps), at=steps)
    drift = [{"step": s_, **fd_against_features(classifier, frames[i], reference_features),
              "mode_entropy": mode_coverage(classifier, frames[i])["entropy"]} for i, s_ in enumerate(steps)]
    rec, kl = chain.reconstruction_and_kl(test[: ev["scatter_points"]])
    return {
        "bound": nll_summary(s.bound),
        "iwae": {**nll_summary(s.iwae), "num_images": s.num_iw, **s.estimate.summary()},
        "parzen": parzen_score(centres, data.valid[: ev["parzen_valid"]], test, ev["parzen_grid"]),
        "fd_classifier": fd_against_features(classifier, samples, reference_features),
        "mode_coverage": mode_coverage(classifier, samples),
        "reconstruction_mse": reconstruction_mse(chain.mean(loc).clamp(0, 1), test),
        "chain_drift": drift,
        "test_rec_kl": {"rec": float(rec.mean()), "kl": float(kl.mean())},
        "log_var": None if chain.log_var is None else float(chain.log_var),
    }


def run(config: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    data = load_dataset(config["dataset"], ctx.data_dir).to(ctx.device)
    ev = config["eval"]
    test = data.test[: config["eval_limit"]] if config["eval_limit"] else data.test
    t0 = time.time()
    trained = train_variants(config, data, ctx)
    train_seconds = time.time() - t0

    classifier = load_fd_classifier(config["dataset"], device=ctx.device)
    reference_features = {split: classifier_features(classifier, getattr(data, split)[: ev["fd_reference"]])
                          for split in ("train", "test")}
    results: dict[str, Any] = {}
    t0 = time.time()
    for name, tr in trained.items():
        pyro.set_rng_seed(config["seed"] + 2)
        results[name] = evaluate_variant(tr["chain"], data, config, classifier, reference_features, test,
                                         ctx.progress)
        results[name]["train"] = {
            "pretrain_updates": tr["pretrain"]["updates"], "fork_updates": tr["fork"]["updates"],
            "pretrain_epochs": tr["pretrain"]["epochs"], "fork_epochs": tr["fork"]["epochs"],
            "fork_final_valid_elbo": -tr["fork"]["valid_nll"], "fork_seconds_this_process": tr["seconds"],
        }
    out = {
        "experiment": EXPERIMENT,
        "config": config,
        "protocol": protocol(config, data, test),
        "variants": results,
        "train_seconds_this_process": train_seconds,
        "eval_seconds": time.time() - t0,
        "device": ctx.device,
        "torch": torch.__version__,
    }
    write_report(ctx.out, "results", out, render_markdown(out), config=config, command=ctx.command)
    for name, tr in trained.items():  # each variant's directory loads with experiments.runs.load_run
        # The evaluated (last) weights alone: checkpoint.pt also holds optimiser state and f, and best.pt is
        # the best validation epoch, which was not evaluated.
        save_checkpoint({"module": tr["chain"].state_dict()}, ctx.out / name / FINAL_WEIGHTS)
        write_json(ctx.out / name / "result.json",
                   {"experiment": EXPERIMENT, "variant": name, "config": config,
                    "weights_file": FINAL_WEIGHTS, "num_steps": tr["chain"].num_steps,
                    "walkback": tr["chain"].walkback, "results": results[name]})
    figures(trained, results, data, config, ctx.out)
    return out


def protocol(config: dict[str, Any], data: Dataset, test: torch.Tensor) -> dict[str, Any]:
    """What every number of the page is, with the sample counts that actually stand behind it."""
    ev, info = config["eval"], CLASSIFIERS[config["dataset"]]
    n_train, n_test = (min(ev["fd_reference"], split.shape[0]) for split in (data.train, data.test))
    n_pv, n_iw = min(ev["parzen_valid"], data.valid.shape[0]), min(ev["iw_limit"] or len(test), len(test))
    n_starts = min(ev["chain_starts"], data.train.shape[0])
    gaussian = config["model"]["likelihood"] == "gaussian"
    pre, un, g = config["pretrain"], config["unroll"], config["guide_f"]

    def schedule(t: dict[str, Any]) -> str:
        lr = f"lr {t['lr']}" if t["lr"] == t["lr_final"] else f"lr {t['lr']} decayed to {t['lr_final']}"
        clip = "no clipping" if t["clip_norm"] is None else f"global gradient-norm clip {t['clip_norm']}"
        return (f"{t['epochs']} epochs of batch {t['batch_size']} × {t['q_samples']} draws of q, Adam {lr}, "
                f"betas {tuple(t['betas'])}, {clip}")

    return {
        "data": data.describe(),
        "binarization": "none: grey levels in [0, 1]; " + (
            "p(x|z) is a Gaussian density on them (continuous: its nats are not comparable with binarised "
            "bounds)" if gaussian else
            "a Bernoulli p(x|z) scores them with the cross-entropy (the paper's MNIST model)"),
        "num_test_images": int(test.shape[0]),
        "training": f"pre-training (the chain run one step, a VAE): {schedule(pre)}; then each variant, "
                    f"forked from its objective's pre-trained model: {schedule(un)}; guided and unrolled "
                    f"variants unroll {un['steps']} steps, "
                    + ("the later steps' free energies back-propagated through the chain points (BPTT)"
                       if un["bptt"] else "the later steps' free energies NOT back-propagated through the "
                       "chain points (unroll.bptt = false; the paper back-propagates them)")
                    + f"; guided variants add the guide function's L_g (weight {g['lg_weight']}, "
                    f"back-propagated through the chain; f: maxout {g['hidden']} in groups of {g['pieces']}, "
                    f"Adam lr {g['lr']}). The paper trained with plain SGD. Every stage trains a fixed "
                    "number of updates; the last weights are evaluated",
        "bound": f"one-step free energy F(x) of Eq. 2 (path-wise KL, analytic), mean of {ev['bound_draws']} "
                 "draws per test image: an upper bound on -log p(x) in expectation (lower is better)",
        "iwae": f"IWAE-{ev['iw_samples']} estimate of -log p(x) on the first {n_iw} test images",
        "parzen": f"Gaussian Parzen window on {ev['parzen_samples']} prior samples (decoder means), sigma "
                  f"from the grid {ev['parzen_grid']} by the mean log-likelihood of the first {n_pv} "
                  "validation images, then the test mean ± standard error: an estimate, with a large bias in "
                  "high dimension (Breuleux et al. 2011)",
        "fd_classifier": f"{info.name} (test accuracy {info.test_accuracy:.1%}): Frechet distance in the "
                         f"classifier's 128-d penultimate features between {ev['fd_samples']} prior samples "
                         f"(decoder means, the first of the Parzen centres) and the first {n_train} training "
                         f"and {n_test} test images",
        "mode_coverage": "entropy (nats) of the classifier's predicted classes over the same prior samples",
        "reconstruction_mse": "mean squared error over pixels between each test image and the decoder "
                              "mean at z = the mean of q(z|x)",
        "chain_drift": f"{n_starts} chains from training images (a fixed random subset), decoder means at "
                       f"steps {sorted(set(ev['chain_steps']))}, FD-classifier against the same {n_train} "
                       f"training and {n_test} test images. The FD of {n_starts} samples is biased upwards "
                       f"against that of the first table's {ev['fd_samples']}: compare within this table",
        "walkback": "walkback variants walk with the chain's feed (model.feed); Alg. 1 samples x from "
                    "p(x|z), which model.feed = sample gives",
    }


# --------------------------------------------------------------------------------------------- report


def render_markdown(r: dict[str, Any]) -> str:
    c, p, v = r["config"], r["protocol"], r["variants"]
    d = p["data"]
    m = c["model"]
    lines = [
        f"# Variational GSN with collaborative shaping on {d['name']} — preset `{c['preset']}`",
        "",
        f"Data: {d['name']} ({d['source']}), split {d['splits']}; scored on the **test** split "
        f"({p['num_test_images']} images). Binarisation: {p['binarization']}.",
        "",
        f"Model: z = {m['z_dim']}, MLPs {m['hidden']}, {m['likelihood']} p(x|z), the chain feeds the decoder "
        f"{m['feed']} forward. ORK: λ = {c['ork']['kl_weight']}, β = {c['ork']['penalty']} (Eq. 5); VAR: "
        f"Eq. 2. Training: {p['training']}.",
        "",
        "## ORK vs VAR (and the plain one-step VAE of the same size)",
        "",
        markdown_table(
            ["variant", "updates (pre + fork)", "test F(x) ↓ (nats, bound)", "IWAE NLL ↓ (nats, estimate)",
             "Parzen test LL ↑ (nats, estimate)", "σ", "FD-classifier vs train ↓", "FD-classifier vs test ↓",
             "class entropy ↑", "recon. MSE ↓"],
            [[name, f"{x['train']['pretrain_updates']} + {x['train']['fork_updates']}",
              f"{x['bound']['nll']:.2f} ± {x['bound']['stderr']:.2f}",
              f"{x['iwae']['nll']:.2f} ± {x['iwae']['stderr']:.2f}",
              f"{x['parzen']['mean']:.1f} ± {x['parzen']['stderr']:.1f}", f"{x['parzen']['sigma']:.3f}",
              f"{x['fd_classifier']['train']:.2f}", f"{x['fd_classifier']['test']:.2f}",
              f"{x['mode_coverage']['entropy']:.3f}", f"{x['reconstruction_mse']:.4f}"]
             for name, x in v.items()],
        ),
        "",
        f"F(x): {p['bound']}. IWAE: {p['iwae']}. Parzen: {p['parzen']}. FD: {p['fd_classifier']}. Class "
        f"entropy: {p['mode_coverage']} (log 10 = {math.log(10):.3f} when all classes are equally frequent). "
        f"Recon. MSE: {p['reconstruction_mse']}. ± is the standard error over test images."
        + (f" Walkback: {p['walkback']}." if any(parse_variant(n)[1] == "walkback" for n in v) else ""),
        "",
        f"For reference only (another data set, not comparable): {PAPER_MNIST}.",
        "",
        "## Chain drift (Fig. 3): FD-classifier of chain samples, by step",
        "",
    ]
    steps = [e["step"] for e in next(iter(v.values()))["chain_drift"]]
    lines += [
        markdown_table(["variant", *[f"step {s}: vs test (vs train)" for s in steps],
                        "growth vs test (last / first)"],
                       [[name, *[f"{e['test']:.2f} ({e['train']:.2f})" for e in x["chain_drift"]],
                         fmt_or_na(x["chain_drift"][-1]["test"] / max(x["chain_drift"][0]["test"], 1e-12),
                                   ".2f")]
                        for name, x in v.items()]),
        "",
        f"Chains: {p['chain_drift']}. Class entropy of the chain samples at the same steps: "
        + "; ".join(f"{name} " + ", ".join(f"{e['mode_entropy']:.2f}" for e in x["chain_drift"])
                    for name, x in v.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def figures(trained: dict[str, dict[str, Any]], results: dict[str, Any], data: Dataset,
            config: dict[str, Any], out: Path) -> None:
    """The PNGs of the page (see the module docstring); the mode-coverage figure shows the histograms of the
    evaluated samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = config["eval"]
    shape = data.image_shape
    starts = data.test[: ev["figure_chains"]]
    mask = make_mask_process(ev["partial_mask"], shape)(starts, torch.Generator(starts.device).manual_seed(0))
    for name, tr in trained.items():
        chain = tr["chain"]
        torch.manual_seed(config["seed"] + 3)
        free = chain.run_chain(starts, ev["figure_frames"] * ev["figure_every"], every=ev["figure_every"])
        grid = torch.cat([starts[None], free]).transpose(0, 1).reshape(-1, starts.shape[1])
        save_image_grid(grid, shape, out / f"chains_{name}.png", ncol=ev["figure_frames"] + 1,
                        title=f"{name}: free chains from test images (left), one frame every "
                              f"{ev['figure_every']} steps")
        part = chain.run_chain(starts, ev["figure_frames"] * ev["partial_every"], mask=mask, fill=FILL,
                               every=ev["partial_every"])
        shown = mask * starts + (1 - mask) * FILL
        grid = torch.cat([starts[None], shown[None], part]).transpose(0, 1).reshape(-1, starts.shape[1])
        save_image_grid(grid, shape, out / f"partial_{name}.png", ncol=ev["figure_frames"] + 2,
                        title=f"{name}: partial control ({ev['partial_mask']} pixels painted in; image, "
                              f"clamped start, one frame every {ev['partial_every']} steps)")
        save_image_grid(chain.sample(64), shape, out / f"samples_{name}.png",
                        title=f"{name}: prior samples (decoder means)")
    save_mode_coverage_figure({k: x["mode_coverage"]["histogram"] for k, x in results.items()},
                              out / "mode_coverage.png",
                              class_names=CLASSIFIERS[config["dataset"]].class_names,
                              title=f"predicted classes of the {ev['fd_samples']} evaluated prior samples "
                                    f"({data.name})")

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, tr in trained.items():
        kind, _ = parse_variant(name)
        n_pre = tr["pretrain"]["updates"]
        pts = [(mm["step"], mm) for mm in tr["pretrain"]["metrics"]] + \
              [(n_pre + mm["step"], mm) for mm in tr["fork"]["metrics"]]
        par = [(s, mm["valid_parzen"]) for s, mm in pts if "valid_parzen" in mm]
        bnd = [(s, mm["valid_bound"]) for s, mm in pts]
        if par:
            axes[0].plot(*zip(*par, strict=True), marker=".", label=name)
        axes[1].plot(*zip(*bnd, strict=True), marker=".", label=name)
        sc = [mm for _, mm in pts if "scatter_rec" in mm]
        for i, mm in enumerate(sc):
            shade = min(1.0, 0.2 + 0.8 * (i + 1) / len(sc))  # float rounding may pass 1
            axes[2].scatter(mm["scatter_kl"], mm["scatter_rec"], s=4, alpha=shade,
                            color=f"C{list(trained).index(name)}", label=name if i == len(sc) - 1 else None)
    axes[0].set(xlabel="update", ylabel="validation Parzen LL (nats, estimate)", title="Parzen (Fig. 4b)")
    axes[1].set(xlabel="update", ylabel="validation -F(x) (nats, bound)", title="variational bound (Fig. 4b)")
    axes[2].set(xlabel="KL(q(z|x) || p(z)) (nats)", ylabel="-log p(x|z) (nats)",
                title=f"recon. vs KL, {ev['scatter_points']} valid images (Fig. 4c)")
    axes[2].text(0.99, 0.99, "darker = later in training", transform=axes[2].transAxes, ha="right", va="top",
                 fontsize=7)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"{data.name}: curves over training (pre-training, then the fork)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "curves.png", dpi=100)
    plt.close(fig)


GSN_EXPERIMENT = Experiment(name=EXPERIMENT, prog="python -m experiments.gsn", description=__doc__,
                            default_out=DEFAULT_OUT, run=run, prepare=prepare,
                            summary=(("results.md", "results.json"),))


def main(argv: list[str] | None = None) -> int:
    return GSN_EXPERIMENT.main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
