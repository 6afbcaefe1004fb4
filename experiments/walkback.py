"""The variational walkback experiment: one transition operator heated by its guide and cooled by its model,
trained on the bound of Eq. 3.5 and judged by that bound, the importance-sampled likelihood of Eq. 3.10, its
samples (also far beyond the training walk), its reversibility and inpainting.

    python -m experiments.walkback --preset quick        # digits and a 2-D toy, a few minutes on a CPU
    python -m experiments.walkback --preset cpu          # Fashion-MNIST, about 2 h on 2 cores
    python -m experiments.walkback --preset paper --device cuda
    python -m experiments.walkback --preset cpu --set 'forms=[bernoulli]'   # one form only

Paper: Goyal (2017), thesis, ch. 3 "Variational walkback" — Alg. 1 (training, online or whole-walk update:
``<form>.update``), Eq. 3.5 (the bound), Eq. 3.10 (importance sampling), Sec. 3.14 (reversibility),
Table 3.1a (bound and IS estimate for 5, 10 and 15 walk steps, MNIST).

Forms (each its own model, trained and scored on its own data):

- ``bernoulli``: the Bernoulli operator on binarised images — trained on dynamically binarised images,
  scored on the test split binarised once with the fixed seed (the protocol of ``experiments.vae`` and
  ``experiments.draw``, so its nats sit beside theirs); p* is a factorised Bernoulli with the tracked mean.
- ``gaussian``: the Gaussian operator on grey levels, uniformly dequantised ((k + u) / L for the L grey
  levels k, u ~ U[0, 1); fresh u per training batch, a fixed draw for scoring): a continuous density on
  [0, 1]^D in nats — never comparable with the binarised nats; the discrete likelihood it bounds is reported
  as bits/dim (log P(k) ≥ log p(x) − D log L).
- ``toy``: the Gaussian operator on a 2-D mixture of Gaussians on a circle, whose exact log-density is known
  (the table sets it beside the bound and the estimate) and whose learned density is drawn.

Protocol (stated in every output): a fixed number of epochs, the weights of the epoch with the best validation
bound evaluated (Alg. 1: "monitoring L on a validation set and doing early stopping" — the stop-gradient
updates do not follow the bound's gradient, and it can worsen as training goes on); the validation bound is
taken at the longest scored walk on the first ``valid_limit`` validation points, one path each. Every walk of
K steps (``eval.walk_steps``, or the form's own) is scored with one heated path per point (the bound; ± the
standard error over points) and, for ``eval.is_walk_steps``, with the importance-sampled estimate (PSIS k-hat
and ESS per point). A model trained with walks of ceil(log2 T_max) + n steps, n ~ U{0..N1}, is scored at
lengths inside that range: a walk of K steps takes K − ceil(log2 T_max) steps at T = 1 before heating.

Outputs in ``--out``: results.json / results.md (the tables), per form a directory with config.json,
metrics.jsonl, checkpoint.pt (for --resume), final.pt and result.json (image forms loadable by
``experiments.sample``), and the figures walks_<form>.png (heating and cooling), samples_<form>.png,
long_run_<form>.png, inpaint_<form>.png, curves_<form>.png and density_toy.png.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import Trace_ELBO

from experiments.common import batched, build_registered, train_best, write_form_run
from experiments.data import (
    Dataset,
    binarization_protocol,
    dynamic_binarize,
    fixed_binarize,
    load_dataset,
    ring_mixture,
    ring_mixture_log_density,
)
from experiments.diffusion import GREY_LEVELS
from experiments.report import (
    markdown_table,
    save_curves,
    save_image_grid,
    save_inpainting_grid,
    write_report,
)
from experiments.runner import Experiment, RunContext
from inference import distributed
from inference.checkpoint import save_figure
from inference.fd_classifier import (
    CLASSIFIERS,
    classifier_features,
    fd_against_features,
    load_fd_classifier,
    mode_coverage,
)
from inference.importance import importance_log_likelihood
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from inference.scoring import nll_summary
from inference.walkback import OnlineWalkbackELBO, PStarMoments
from ppl_models.masks import make_mask_process
from ppl_models.walkback import VariationalWalkback, reversibility

EXPERIMENT = "walkback"
DEFAULT_OUT = "runs/walkback"
FORMS = ("bernoulli", "gaussian", "toy")
IMAGE_FORMS = ("bernoulli", "gaussian")
FINAL_WEIGHTS = "final.pt"
#: the thesis' MNIST numbers (continuous density, Gaussian operator), quoted with their data set
THESIS_TABLE = ("MNIST, Gaussian operator, test LL (nats, ↑; Goyal 2017, Table 3.1a): 5 steps 510, 10 steps "
                "801, 15 steps 1018 (bounds), IS estimate 1243; reversibility ratio 3.6 % (Sec. 3.14)")
DEQUANTIZATION_SEED = 0


def heating_steps(sizes: dict[str, Any]) -> int:
    return math.ceil(math.log2(sizes["t_max"]))


def walks(form: str, config: dict[str, Any]) -> tuple[list[int], list[int]]:
    """The walk lengths a form is scored at, and those also importance-sampled: its own, else eval's."""
    sizes, ev = config[form], config["eval"]
    return (sizes.get("walk_steps") or ev["walk_steps"], sizes.get("is_walk_steps") or ev["is_walk_steps"])


def prepare(config: dict[str, Any], args: Any, parser: Any) -> None:
    forms = config["forms"]
    if not forms or any(f not in FORMS for f in forms) or len(set(forms)) != len(forms):
        parser.error(f"forms must be a non-empty list of distinct forms from {list(FORMS)}, got {forms}")
    if config["dataset"] not in GREY_LEVELS:
        parser.error(f"dataset {config['dataset']!r}: the walkback experiment knows the grey levels of "
                     f"{sorted(GREY_LEVELS)}")
    for form in forms:
        scored, sampled = walks(form, config)
        if not set(sampled) <= set(scored):
            parser.error(f"the importance-sampled walk lengths {sampled} of form {form!r} must be among its "
                         f"scored ones {scored} (eval.is_walk_steps / eval.walk_steps, or {form}'s own)")
        sizes, t = config[form], config[f"train_{form}"]
        if sizes["update"] == "online" and t["lr"] != t["lr_final"]:
            parser.error(f"{form}.update 'online' takes one optimiser step per walk step, so a per-update "
                         f"learning-rate decay would run K times too fast: set train_{form}.lr_final = "
                         f"train_{form}.lr ({t['lr']}), or use {form}.update = 'walk'")
        lo, hi = max(1, heating_steps(sizes)), max(1, heating_steps(sizes) + sizes["max_extra"])
        bad = [k for k in scored if not lo <= k <= hi]
        if bad:
            parser.error(f"walk lengths {bad} outside the walk lengths form {form!r} trains on "
                         f"({lo}..{hi} = ceil(log2 {form}.t_max) + 0..{form}.max_extra)")


def model_sizes(form: str, config: dict[str, Any]) -> dict[str, Any]:
    """The registered model's constructor arguments for ``form`` (what result.json records)."""
    training = ("update", "star_momentum", "walk_steps", "is_walk_steps")
    sizes = {k: v for k, v in config[form].items() if k not in training}
    sizes["form"] = "bernoulli" if form == "bernoulli" else "gaussian"
    return sizes


def dequantize(x: torch.Tensor, levels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Grey levels k / (L − 1) in [0, 1] → (k + u) / L, u ~ U[0, 1): a continuous density's data."""
    k = torch.round(x * (levels - 1))
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (k + u) / levels


def form_data(form: str, config: dict[str, Any], data: Dataset | None, device: str) -> dict[str, Any]:
    """A form's training points and per-batch transform (before the walk is drawn) and its fixed valid and
    test points."""
    if form == "toy":
        t, g = config["toy_data"], torch.Generator().manual_seed(config["seed"])
        draw = {s: ring_mixture(t["modes"], t["radius"], t["sd"], t[s], g).to(device)
                for s in ("train", "valid", "test")}
        return {**draw, "transform": None}
    assert data is not None
    if form == "bernoulli":
        return {"train": data.train, "transform": dynamic_binarize, "valid": fixed_binarize(data.valid),
                "test": fixed_binarize(data.test), "train_scored": fixed_binarize(data.train)}
    levels = GREY_LEVELS[config["dataset"]]

    def fixed(x: torch.Tensor) -> torch.Tensor:
        return dequantize(x, levels, torch.Generator(x.device).manual_seed(DEQUANTIZATION_SEED))

    return {"train": data.train, "transform": lambda x, g: dequantize(x, levels, g),
            "valid": fixed(data.valid), "test": fixed(data.test), "train_scored": fixed(data.train)}


def bound_of(pair: VariationalWalkback, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """One heated path's bound (Eq. 3.5) per row of ``x`` at the pair's current walk, float64 on the CPU."""
    elbo = PathwiseKL_ELBO(analytic=False)
    with torch.no_grad():
        return torch.cat(batched(lambda b: elbo.per_datum(pair.model, pair.guide, b).double().cpu(), x,
                                 batch_size=batch_size))


def walk_transform(pair: VariationalWalkback, base: Callable | None) -> Callable:
    """The training transform: a walk length K = ceil(log2 T_max) + n, n ~ U{0..N1}, drawn per minibatch
    (Eq. 3.1), then ``base`` (binarisation) if any. Under torchrun every process takes rank 0's K, so all run
    the same number of online steps (and collectives)."""

    def transform(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        pair.draw_walk(g)
        if distributed.is_distributed():
            pair.n, pair.walk_steps = distributed.broadcast_object((pair.n, pair.walk_steps))
        return x if base is None else base(x, g)

    return transform


def train_form(pair: VariationalWalkback, form: str, config: dict[str, Any], fd: dict[str, Any], out: Path,
               ctx: RunContext) -> dict[str, Any]:
    t, sizes, ev = config[f"train_{form}"], config[form], config["eval"]
    out.mkdir(parents=True, exist_ok=True)
    loss = OnlineWalkbackELBO(pair) if sizes["update"] == "online" else Trace_ELBO()
    longest = max(walks(form, config)[0])
    transform = walk_transform(pair, fd["transform"])

    def batch_nll(x: torch.Tensor) -> torch.Tensor:
        pair.eval()
        pair.set_walk(longest)
        return -bound_of(pair, x, x.shape[0]).sum()

    stage = {"train": t, "eval": ev, "seed": config["seed"]}
    resume = ctx.resume and (out / "checkpoint.pt").is_file()
    valid = (fd["valid"][: t["valid_limit"]],)
    return train_best(pair, loss, batch_nll, stage, fd["train"], transform, valid, out, ctx.device, resume,
                      ctx.progress, extras=[PStarMoments(pair, sizes["star_momentum"])])


def score_walks(pair: VariationalWalkback, form: str, config: dict[str, Any], fd: dict[str, Any],
                progress: bool) -> list[dict[str, Any]]:
    """Table 3.1a's rows: per walk length, the bound and (where asked) the IS estimate on train and test."""
    ev, rows = config["eval"], []
    n = ev["bound_images"] or None
    limit = config["eval_limit"] or None
    splits = {"train": fd.get("train_scored", fd["train"]), "test": fd["test"][:limit]}
    scored, sampled = walks(form, config)
    for K in scored:
        pair.set_walk(K)
        row: dict[str, Any] = {"walk_steps": K, "temperatures": pair.temperatures()}
        for split, x in splits.items():
            ll = bound_of(pair, x[:n], ev["batch_size"])
            s = nll_summary(-ll)
            row[f"{split}_bound"] = {"ll": -s["nll"], "stderr": s["stderr"], "num": int(ll.numel())}
            if K in sampled:
                est = importance_log_likelihood(
                    pair.model, pair.guide, x[: ev["is_images"]], ev["is_samples"],
                    batch_size=max(1, ev["batch_size"] // ev["is_chunk"]), chunk_size=ev["is_chunk"],
                    progress=progress)
                e = est.summary()
                row[f"{split}_is"] = {"ll": -e["nll"], "stderr": e["nll_stderr"], "num": e["num_data"],
                                      "samples": e["num_samples"], "ess_mean": e["ess_mean"],
                                      "khat": {k: v for k, v in e.items() if k.startswith("khat")},
                                      "bound_same_points": float(ll[: ev["is_images"]].mean())}
        rows.append(row)
    return rows


@torch.no_grad()
def evaluate_form(pair: VariationalWalkback, form: str, config: dict[str, Any], fd: dict[str, Any],
                  data: Dataset | None, classifier: Any, reference: dict[str, torch.Tensor], out: Path,
                  progress: bool) -> dict[str, Any]:
    ev = config["eval"]
    pair.eval()
    t0 = time.time()
    result: dict[str, Any] = {"walks": score_walks(pair, form, config, fd, progress),
                              "score_seconds": time.time() - t0}
    D = fd["test"].shape[1]
    if form == "gaussian":
        levels = GREY_LEVELS[config["dataset"]]
        for row in result["walks"]:  # the discrete likelihood the continuous density bounds
            for key in ("test_bound", "test_is"):
                if key in row:
                    row[key]["bits_per_dim_discrete"] = discrete_bits_per_dim(row[key]["ll"], D, levels)
    longest = max(walks(form, config)[0])
    pair.set_walk(longest)
    chains = fd["test"][: ev["reversibility_chains"]]
    result["reversibility"] = reversibility(pair.operator, chains, ev["reversibility_steps"],
                                            ev["reversibility_burn_in"])
    if form != "bernoulli":  # Alg. 1's T_max = σ²_max / σ²: the learned σ² at T = 1 against the data's
        var = pair.operator(fd["test"], 1.0).base_dist.scale.pow(2).mean()
        data_var = fd["train"].var(0).mean()
        result["noise"] = {"sigma2_t1": float(var), "data_variance": float(data_var),
                           "implied_t_max": float(data_var / var), "t_max": config[form]["t_max"]}
    images = form != "toy"  # image samples are the last step's means; the toy's are draws of s_0
    samples = torch.cat([pair.sample(min(ev["batch_size"], ev["fd_samples"] - i), mean=images, clamp=images)
                         for i in range(0, ev["fd_samples"], ev["batch_size"])])
    long_steps = ev["long_run"] * longest
    states = pair.p_star(ev["fd_samples"]).sample()
    long = continue_at_t1(pair, states, long_steps, ev["batch_size"], mean=images)
    result["samples"] = {"num": int(samples.shape[0]), "walk_steps": longest, "long_run_steps": long_steps}
    if form == "toy":
        t = config["toy_data"]
        exact = ring_mixture_log_density(fd["test"], t["modes"], t["radius"], t["sd"]).cpu()
        result["exact_test_ll"] = {"ll": float(exact.mean()), "num": int(exact.numel()),
                                   "stderr": float(exact.std() / exact.numel() ** 0.5)}
        result["sample_exact_ll"] = {
            name: float(ring_mixture_log_density(x, t["modes"], t["radius"], t["sd"]).mean())
            for name, x in (("cooled", samples), ("long_run", long))}
        toy_density_figure(pair, config, fd, samples, out / "density_toy.png")
        return result
    assert data is not None
    images = {"cooled": samples.clamp(0, 1), "long_run": long.clamp(0, 1)}
    result["fd_classifier"] = {k: fd_against_features(classifier, v, reference) for k, v in images.items()}
    result["mode_coverage"] = {k: mode_coverage(classifier, v) for k, v in images.items()}
    figures(pair, form, config, fd, data, images, out)
    return result


@torch.no_grad()
@torch.no_grad()
def bound_terms(pair: VariationalWalkback, x: torch.Tensor) -> list[dict[str, Any]]:
    """Eq. 3.5 site by site on one heated path per row of ``x`` at the pair's current walk: the mean ln p
    (model) and ln q (guide) of each state s_K … s_0 (sites z_0 … z_{K−1}, x; s_K's ln p is ln p*(s_K), and
    s_0 = x has no ln q) — where the bound is lost, e.g. p* far from the heated end states."""
    import pyro.poutine as poutine

    guide = poutine.trace(pair.guide).get_trace(x)
    model = poutine.trace(poutine.replay(pair.model, trace=guide)).get_trace(x)
    guide.compute_log_prob()
    model.compute_log_prob()
    K = pair.walk_steps
    return [{"state": f"s_{K - k}", "site": name, "log_p": float(model.nodes[name]["log_prob"].mean()),
             "log_q": float(guide.nodes[name]["log_prob"].mean()) if name in guide.nodes else 0.0}
            for k, name in enumerate([*pair.latent_sites, "x"])]


def discrete_bits_per_dim(ll: float, dims: int, levels: int) -> float:
    """Bits/dim of the L-level images that a continuous density's log-likelihood ``ll`` (nats, on the
    dequantised points (k + u) / L in [0, 1]^D) bounds: log P(k) ≥ log p(x) − D log L, so
    bits/dim ≤ (log L − ll / D) / log 2."""
    return (math.log(levels) - ll / dims) / math.log(2)


def continue_at_t1(pair: VariationalWalkback, states: torch.Tensor, steps: int, batch_size: int,
                   every: int | None = None, mean: bool = True) -> Any:
    """Cool ``states`` along the pair's walk, then run the operator ``steps`` more steps at T = 1; returns the
    last means (``mean=False``: drawn states), or every ``every``-th step's, per batch."""
    outs = []
    for i in range(0, states.shape[0], batch_size):
        s = pair.cool(states[i : i + batch_size], mean=False)  # a drawn s_0 to continue from
        outs.append(pair.run(s, steps, every=every, mean=mean))
    if every is not None:
        return [torch.cat([o[j] for o in outs]) for j in range(len(outs[0]))]
    return torch.cat(outs)


def figures(pair: VariationalWalkback, form: str, config: dict[str, Any], fd: dict[str, Any], data: Dataset,
            images: dict[str, torch.Tensor], out: Path) -> None:
    ev, shape = config["eval"], data.image_shape
    K = pair.walk_steps
    save_image_grid(images["cooled"][: ev["grid_samples"]], shape, out / f"samples_{form}.png",
                    title=f"{form} walkback: samples, a cooling walk of K = {K} steps from p* (means of the "
                          "last step)")
    x = fd["test"][: ev["walk_chains"]]
    heat = [s.clamp(0, 1) for s in pair.heat(x)]
    start = pair.p_star(ev["walk_chains"]).sample()
    cool = pair.cool(start, every_step=True)
    rows = [torch.stack([x, *heat], 1), torch.stack([start, *cool], 1)]  # K + 1 columns each
    grid = torch.cat(rows, 0).clamp(0, 1).reshape(-1, x.shape[1])
    save_image_grid(grid, shape, out / f"walks_{form}.png", ncol=K + 1,
                    title=f"{form}: top {ev['walk_chains']} rows, the guide heating test images x = s_0 → "
                          f"s_K (T = {', '.join(f'{t:g}' for t in pair.temperatures())}); bottom rows, the "
                          "model cooling: a draw s_K ~ p*, then the means of s_{K−1} … s_0")
    every = max(1, ev["long_run"] * K // 10)
    frames = continue_at_t1(pair, pair.p_star(ev["walk_chains"]).sample(), ev["long_run"] * K,
                            ev["batch_size"], every=every)
    grid = torch.stack(frames, 1).clamp(0, 1).reshape(-1, x.shape[1])
    save_image_grid(grid, shape, out / f"long_run_{form}.png", ncol=len(frames),
                    title=f"{form}: after the K = {K}-step cooling walk, {ev['long_run'] * K} more steps at "
                          f"T = 1 (10 × K or more), every {every} steps left to right")
    x = fd["test"][: ev["inpaint_images"]]
    mask = make_mask_process(ev["inpaint_mask"], shape)(x, torch.Generator(x.device).manual_seed(0))
    filled = pair.inpaint(x, mask)
    save_inpainting_grid(x, mask, filled, shape, out / f"inpaint_{form}.png",
                         title=f"{form}: inpainting under {ev['inpaint_mask']} (known pixels clamped at "
                               "every step of the cooling walk); per image: original | known (grey: missing) "
                               "| imputed")


def toy_density_figure(pair: VariationalWalkback, config: dict[str, Any], fd: dict[str, Any],
                       samples: torch.Tensor, path: Path) -> None:
    """True log-density, the learned one (IS estimate on a grid, Eq. 3.10) and samples against data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, ev = config["toy_data"], config["eval"]
    lim = t["radius"] + 4 * t["sd"]
    g = torch.linspace(-lim, lim, ev["toy_grid"])
    grid = torch.cartesian_prod(g, g).to(fd["test"].device)  # rows (x, y), y fastest
    true = ring_mixture_log_density(grid, t["modes"], t["radius"], t["sd"]).reshape(len(g), len(g)).cpu()
    est = importance_log_likelihood(pair.model, pair.guide, grid, ev["toy_is_samples"],
                                    batch_size=max(1, ev["batch_size"] // ev["is_chunk"]),
                                    chunk_size=ev["is_chunk"], diagnostics=False)
    learned = est.log_likelihood.reshape(len(g), len(g)).cpu()
    lo = float(true.max()) - 12
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    for ax, z, name in ((axes[0], true, "true log-density"),
                        (axes[1], learned, f"learned: IS estimate ({ev['toy_is_samples']} paths, K = "
                                           f"{pair.walk_steps})")):
        im = ax.imshow(z.clamp(min=lo).T.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), vmin=lo,
                       vmax=float(true.max()), cmap="viridis")
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    test, s = fd["test"].cpu(), samples.cpu()
    axes[2].scatter(test[:, 0], test[:, 1], s=3, alpha=0.4, label="test data")
    axes[2].scatter(s[:, 0], s[:, 1], s=3, alpha=0.4, label="samples")
    axes[2].set_xlim(-lim, lim)
    axes[2].set_ylim(-lim, lim)
    axes[2].set_aspect("equal")
    axes[2].legend(fontsize=8, markerscale=3)
    axes[2].set_title("samples (cooling walk) and test points", fontsize=9)
    fig.suptitle(f"variational walkback on {t['modes']} Gaussians (sd {t['sd']}) on a circle of radius "
                 f"{t['radius']}: log-densities clipped at max − 12 nats", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def save_form_curves(form: str, config: dict[str, Any], metrics: list[dict[str, Any]], path: Path) -> None:
    K = max(walks(form, config)[0])
    train_key = "train −L (walks of random length)"
    valid_key = f"valid −L (K = {K})"
    rows = [{"epoch": r["epoch"], train_key: r["train_loss"], valid_key: -r["valid_bound"]} for r in metrics]
    unit = "nats per point" if form == "toy" else "nats per image"
    save_curves(rows, [train_key, valid_key], path, ylabel=f"{unit} (−bound)",
                title=f"{form} walkback, {config[form]['update']} update: −bound per epoch, one path per "
                      "point")


def protocol(config: dict[str, Any], data: Dataset | None) -> dict[str, Any]:
    ev = config["eval"]
    out: dict[str, Any] = {
        "training": {f: training_text(f, config) for f in config["forms"]},
        "bound": "Eq. 3.5 with one heated path per point (PathwiseKL_ELBO(analytic=False): every site a "
                 "Monte Carlo term), a lower bound on log p(x) in expectation; ± the standard error over "
                 "points",
        "importance": f"Eq. 3.10: log of the mean of p(x, s_1..s_K) / q(s_1..s_K | x) over "
                      f"{ev['is_samples']} heated paths per point (an estimate, a stochastic lower bound "
                      "that tightens with more paths), PSIS k-hat and ESS per point",
        "reversibility": f"Sec. 3.14: {ev['reversibility_chains']} chains started at test points, "
                         f"{ev['reversibility_burn_in']} burn-in steps, then {ev['reversibility_steps']} "
                         "steps at T = 1; the mean of ln p(s_{t+1}|s_t) − ln p(s_t|s_{t+1}) "
                         "per step (nats; KL of forward against reversed transitions) and, for the Bernoulli "
                         "operator, its ratio to the per-step entropy −ln p(s_{t+1}|s_t)",
    }
    if data is not None:
        levels = GREY_LEVELS[config["dataset"]]
        info = CLASSIFIERS[config["dataset"]]
        out["data"] = data.describe()
        out["binarization"] = {
            "bernoulli": binarization_protocol()["description"],
            "gaussian": f"none: {levels} grey levels k uniformly dequantised to (k + u) / {levels} "
                        f"(u ~ U[0, 1), fresh per training batch, one fixed draw with seed "
                        f"{DEQUANTIZATION_SEED} for scoring): a continuous density in nats; bits/dim of "
                        f"the discrete image = (log {levels} − LL / D) / log 2 (a bound on the discrete "
                        "likelihood)"}
        out["fd_classifier"] = (f"{info.name} (test accuracy {info.test_accuracy:.1%}): Fréchet distance in "
                                f"the classifier's 128-d penultimate features between {ev['fd_samples']} "
                                "samples (means of the last step, clipped to [0, 1]) and the first "
                                f"{ev['fd_reference']} training and test images (grey levels); biased "
                                "upwards for fewer samples")
    if "toy" in config["forms"]:
        t = config["toy_data"]
        out["toy"] = (f"{t['modes']} equally weighted Gaussians of sd {t['sd']} on a circle of radius "
                      f"{t['radius']}; {t['train']} / {t['valid']} / {t['test']} points drawn with seed "
                      f"{config['seed']}; exact log-density known")
    return out


def training_text(form: str, config: dict[str, Any]) -> str:
    t, s = config[f"train_{form}"], config[form]
    lr = (f"lr {t['lr']}" if t["lr"] == t["lr_final"] else
          f"lr {t['lr']} decayed per update to {t['lr_final']}")
    update = ("online (Alg. 1: one Adam step per walk step)" if s["update"] == "online" else
              "whole-walk (one Adam step per minibatch on the path's bound)")
    h = heating_steps(s)
    clip = "no clipping" if t["clip_norm"] is None else f"global gradient-norm clip {t['clip_norm']}"
    gain = f", a gain on 2s − 1 started at {s['skip']:g}" if form == "bernoulli" else ""
    return (f"F an MLP {s['hidden']} with {s['norm']} normalisation per temperature level{gain}, α "
            f"{s['alpha']}, T_max {s['t_max']:g}, walks of K = {h} + n, n ~ U{{0..{s['max_extra']}}} per "
            f"minibatch; {update}; p* moments moved by {s['star_momentum']} per minibatch; {t['epochs']} "
            f"epochs of batch {t['batch_size']}, Adam {lr}, {clip}; the weights of the epoch with the best "
            "validation bound (Alg. 1's early stopping)")


def run(config: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    images = [f for f in config["forms"] if f in IMAGE_FORMS]
    data = load_dataset(config["dataset"], ctx.data_dir).to(ctx.device) if images else None
    classifier, reference = None, {}
    if data is not None:
        classifier = load_fd_classifier(config["dataset"], device=ctx.device)
        reference = {s: classifier_features(classifier, getattr(data, s)[: config["eval"]["fd_reference"]])
                     for s in ("train", "test")}
    forms: dict[str, Any] = {}
    for form in config["forms"]:
        fd = form_data(form, config, data, ctx.device)
        pyro.set_rng_seed(config["seed"])
        sizes = model_sizes(form, config)
        x = fd["train"]
        pair = build_registered("walkback", sizes, x.shape[1], init_mean=x.mean(0), init_var=x.var(0))
        pair.to(ctx.device)
        t0 = time.time()
        fit = train_form(pair, form, config, fd, ctx.out / form, ctx)
        train_seconds = time.time() - t0
        pyro.set_rng_seed(config["seed"] + 1)
        result = evaluate_form(pair, form, config, fd, data, classifier, reference, ctx.out, ctx.progress)
        result["train"] = {"epochs": fit["epochs"], "evaluated_epoch": fit["evaluated_epoch"],
                           "updates": fit["updates"],
                           "update": config[form]["update"], "evaluated_valid_bound": -fit["valid_nll"],
                           "seconds_this_process": train_seconds}
        forms[form] = result
        write_form_run(ctx.out / form, EXPERIMENT, form, config, sizes, pair, result, FINAL_WEIGHTS)
        if fit["metrics"]:
            save_form_curves(form, config, fit["metrics"], ctx.out / f"curves_{form}.png")
    out = {"experiment": EXPERIMENT, "config": config, "protocol": protocol(config, data), "forms": forms,
           "device": ctx.device, "torch": torch.__version__}
    write_report(ctx.out, "results", out, render_markdown(out), config=config, command=ctx.command)
    return out


def _pm(x: dict[str, Any] | None, key: str = "ll") -> str:
    return "—" if x is None else f"{x[key]:.2f} ± {x['stderr']:.2f}"


def render_markdown(r: dict[str, Any]) -> str:
    c, p, f = r["config"], r["protocol"], r["forms"]
    lines = [f"# Variational walkback — preset `{c['preset']}`", ""]
    if "data" in p:
        d = p["data"]
        lines += [f"Images: {d['name']} ({d['source']}), split {d['splits']}; scored on the stated splits.",
                  "",
                  "Binarisation: " + "; ".join(f"{k} form — {v}" for k, v in p["binarization"].items()
                                               if k in f) + ". The Bernoulli form's nats are on binarised "
                  "images, the Gaussian form's a continuous density on dequantised grey levels: never "
                  "compare the two.", ""]
    if "toy" in p:
        lines += [f"2-D toy: {p['toy']}.", ""]
    for form, x in f.items():
        unit = "nats per point" if form == "toy" else "nats per image"
        lines += [f"## {form} form", "",
                  f"Training: {p['training'][form]}; {x['train']['updates']} minibatches; epoch "
                  f"{x['train']['evaluated_epoch']} of {x['train']['epochs']} evaluated.", "",
                  f"Log-likelihood ({unit}, ↑; the shape of the thesis' Table 3.1a). One trained model "
                  "scored at several walk lengths: a longer walk adds steps at T = 1 before the same heating "
                  "steps (Eq. 3.1's n), whereas the thesis' rows are, as we read them, models annealed over "
                  "more steps:", ""]
        rows = []
        for w in x["walks"]:
            temps = ", ".join(f"{t:g}" for t in w["temperatures"])
            rows.append([f"VW ({w['walk_steps']} steps, bound)", temps,
                         f"{_pm(w['train_bound'])} ({w['train_bound']['num']})",
                         f"{_pm(w['test_bound'])} ({w['test_bound']['num']})"])
            if "test_is" in w:
                e = w["test_is"]
                rows.append([f"VW ({w['walk_steps']} steps, IS estimate, {e['samples']} paths)", temps,
                             f"{_pm(w['train_is'])} ({w['train_is']['num']})",
                             f"{_pm(e)} ({e['num']}); bound on the same points {e['bound_same_points']:.2f}; "
                             f"ESS {e['ess_mean']:.1f}; k-hat > 0.7: "
                             f"{e['khat']['khat_frac_gt_0.7']:.0%}"])
        if form == "toy":
            ex = x["exact_test_ll"]
            rows.append(["exact log p(x) of the toy", "—", "—", f"{_pm(ex)} ({ex['num']})"])
        lines += [markdown_table(["model", "temperatures T_1..T_K", "train LL (points)", "test LL (points)"],
                                 rows), ""]
        if form == "gaussian":
            levels = GREY_LEVELS[c["dataset"]]
            lines += [f"Discrete-image bits/dim implied (a bound on the likelihood of the {levels}-level "
                      "images): " + "; ".join(
                f"{w['walk_steps']} steps {w['test_bound']['bits_per_dim_discrete']:.3f}" for w in x["walks"])
                + ".", ""]
        rv = x["reversibility"]
        ratio = "" if rv["ratio"] is None else f", {100 * rv['ratio']:.2f} % of the per-step entropy"
        kind = "entropy" if form == "bernoulli" else "differential entropy (it can be negative: no ratio)"
        lines += [f"Reversibility (Sec. 3.14): {rv['kl_per_step']:.4f} ± {rv['kl_stderr']:.4f} nats per step"
                  f"{ratio} (per-step {kind} estimate {rv['entropy_per_step']:.3f} nats; {rv['chains']} "
                  f"chains, {rv['steps']} steps after {rv['burn_in']} burn-in).", ""]
        if "noise" in x:
            nz = x["noise"]
            lines += [f"Noise at T = 1 (Alg. 1's σ²): mean variance {nz['sigma2_t1']:.3g} on test points, "
                      f"against the data's mean variance {nz['data_variance']:.3g}: σ²_max / σ² = "
                      f"{nz['implied_t_max']:.0f} for the preset's T_max = {nz['t_max']:g}.", ""]
        s = x["samples"]
        if form == "toy":
            e = x["sample_exact_ll"]
            lines += [f"Samples ({s['num']}): mean exact log-density of the cooled samples "
                      f"{e['cooled']:.2f}, after {s['long_run_steps']} more steps at T = 1 "
                      f"{e['long_run']:.2f} (test points: {x['exact_test_ll']['ll']:.2f}). Figure: "
                      "density_toy.png.", ""]
        else:
            fdc, mc = x["fd_classifier"], x["mode_coverage"]
            lines += [markdown_table(
                ["samples", "FD-classifier vs train ↓", "FD-classifier vs test ↓", "class entropy ↑"],
                [[f"cooling walk of K = {s['walk_steps']} ({s['num']} samples)", fdc["cooled"]["train"],
                  fdc["cooled"]["test"], f"{mc['cooled']['entropy']:.3f}"],
                 [f"then {s['long_run_steps']} more steps at T = 1", fdc["long_run"]["train"],
                  fdc["long_run"]["test"], f"{mc['long_run']['entropy']:.3f}"]]), ""]
    lines += [f"Bound: {p['bound']}. IS: {p['importance']}. Reversibility: {p['reversibility']}."]
    if "fd_classifier" in p:
        lines += ["", f"FD: {p['fd_classifier']}. Class entropy: entropy (nats) of the predicted classes "
                  f"(log 10 = {math.log(10):.3f})."]
    lines += ["", f"For reference only (another data set, not comparable in value): {THESIS_TABLE}.", ""]
    return "\n".join(lines)


# The SVI step by default: the online update (Alg. 1) steps Pyro's optimiser once per walk step.
WALKBACK_EXPERIMENT = Experiment(name=EXPERIMENT, prog="python -m experiments.walkback", description=__doc__,
                                 default_out=DEFAULT_OUT, run=run, prepare=prepare,
                                 summary=(("results.md", "results.json"),), default_step="svi")


def main(argv: list[str] | None = None) -> int:
    return WALKBACK_EXPERIMENT.main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
