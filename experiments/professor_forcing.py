"""The professor-forcing experiment: one GRU generator trained by teacher forcing and one by professor
forcing, side by side from the same seed, on characters of real English text or on binarised images read
pixel by pixel; scored by test NLL, free-running samples far beyond the training length, and how close the
free-running hidden states sit to the teacher-forced ones.

    python -m experiments.professor_forcing --preset quick     # fortunes text, short sequences, minutes
    python -m experiments.professor_forcing --preset cpu       # about 2 h on 2 cores
    python -m experiments.professor_forcing --preset paper --device cuda
    python -m experiments.professor_forcing --preset quick --text my.txt   # any UTF-8 text file

Paper: Goyal (2017), thesis, ch. 2 — Eqs. 2.1-2.4 (the losses), Sec. 2.4.1 (the generator, the
discriminator and the gates), Fig. 2.3 (teacher-forced against free-running hidden states in t-SNE).

Protocol (stated in every output): text is the corpus of :func:`experiments.data.load_text_corpus`, split
90/5/5 by position, cut into non-overlapping sequences of ``data.seq_len`` characters, scored in bits per
character; pixels are the data set's images (block-averaged by ``data.downsample``), binarised afresh for
every training batch and once with the fixed seed for scoring, in nats per image. Both variants train the
same number of epochs from the same seed, and the epoch with the best validation NLL is evaluated (on every
validation sequence, up to ``data.max_eval``: ``train.valid_limit`` is not used by this experiment). The
hidden-state comparison is computed in the GRU's state space (not in t-SNE space): the distance between the
centroids of the teacher-forced and free-running states, and the mean distance from each free-running state
to its nearest teacher-forced state; t-SNE only draws them.

Outputs in ``--out``: results.json / results.md, per variant a directory with config.json, metrics.jsonl,
checkpoint.pt, best.pt and result.json (and for professor forcing gates.jsonl: D's accuracy and both gates at
every step), and the figures curves_<variant>.png (NLL, discriminator accuracy,
gates), states_<variant>.png (t-SNE), samples_<variant>.png (pixels) or samples_<variant>.txt (text).
"""

from __future__ import annotations

import json
import math
import textwrap
import time
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import Trace_ELBO

from experiments.common import batched, build_registered, train_best
from experiments.data import downsample, dynamic_binarize, fixed_binarize, load_dataset, load_text_corpus
from experiments.report import markdown_table, save_curves, save_image_grid, write_json, write_report
from experiments.runner import Experiment, RunContext
from inference.checkpoint import atomic_write, save_figure, write_text
from inference.professor_forcing import ProfessorForcing
from inference.scoring import nll_summary
from ppl_models.gru_generator import GRUGenerator

EXPERIMENT = "professor_forcing"
DEFAULT_OUT = "runs/professor_forcing"
VARIANTS = ("teacher", "professor")


def add_args(parser: Any) -> None:
    parser.add_argument("--text", default=None, metavar="FILE",
                        help="a UTF-8 text file to model instead of the fortunes corpus (sets "
                        "data.text_file)")


def prepare(config: dict[str, Any], args: Any, parser: Any) -> None:
    v = config["variants"]
    if not v or any(x not in VARIANTS for x in v) or len(set(v)) != len(v):
        parser.error(f"variants must be a non-empty list of distinct names from {list(VARIANTS)}, got {v}")
    if args.text is not None:
        config["data"]["text_file"] = args.text


def sequences(config: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Training, validation and test sequences (N, L), the per-batch transform, and what they are."""
    d = config["data"]

    def cap(x: torch.Tensor, n: int) -> torch.Tensor:  # the first n sequences (0: all)
        return x[:n] if n else x

    if d["kind"] == "text":
        corpus = load_text_corpus(d["text_file"])
        s = {split: corpus.sequences(split, d["seq_len"]) for split in ("train", "valid", "test")}
        return {"train": cap(s["train"], d["max_train"]), "valid": cap(s["valid"], d["max_eval"]),
                "test": cap(s["test"], d["max_eval"]), "transform": None, "vocab": len(corpus.alphabet),
                "corpus": corpus, "describe": corpus.describe(), "unit": "bits per character"}
    data = load_dataset(config["dataset"], ctx.data_dir)
    f = d["downsample"]
    shape = (data.image_shape[0] // f, data.image_shape[1] // f)
    if d["seq_len"] != shape[0] * shape[1]:  # a report must not state a length that did not run
        raise ValueError(f"data.seq_len is {d['seq_len']}, but pixel sequences are whole {shape[0]} x "
                         f"{shape[1]} images of {config['dataset']} at data.downsample={f}: set "
                         f"data.seq_len={shape[0] * shape[1]}")
    small = {split: downsample(getattr(data, split), data.image_shape, f)
             for split in ("train", "valid", "test")}
    return {"train": cap(small["train"], d["max_train"]), "transform": dynamic_binarize,
            "valid": fixed_binarize(cap(small["valid"], d["max_eval"])),
            "test": fixed_binarize(cap(small["test"], d["max_eval"])), "vocab": 2, "shape": shape,
            "describe": {**data.describe(), "image_shape": list(shape), "downsample": f},
            "unit": "nats per image"}


def build(config: dict[str, Any], seqs: dict[str, Any]) -> GRUGenerator:
    m, text = config["model"], config["data"]["kind"] == "text"
    sizes = {"hidden": m["hidden"], **({"vocab": seqs["vocab"], "embed": m["embed"]} if text else {})}
    return build_registered("gru-chars" if text else "gru-pixels", sizes, seqs["test"].shape[1])


@torch.no_grad()
def test_nll(gen: GRUGenerator, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """−log p(x) per sequence (nats), float64 on the CPU."""
    return torch.cat(batched(lambda b: -gen.log_likelihood(b).double().cpu(), x, batch_size=batch_size))


@torch.no_grad()
def state_comparison(gen: GRUGenerator, x: torch.Tensor, points: int, path: Path,
                     title: str) -> dict[str, float]:
    """Teacher-forced states on ``x`` against as many free runs of the same length: centroid distance and
    mean nearest-teacher-forced distance of the free-running states (in state space), and a t-SNE figure."""
    tf = gen.teacher_forced(x).hidden.reshape(-1, gen.hidden_size)
    fr = gen.free_running(x.shape[0], x.shape[1]).hidden.reshape(-1, gen.hidden_size)
    nearest = torch.cat([torch.cdist(chunk, tf).min(1).values for chunk in fr.split(1024)])
    out = {"centroid_distance": float((tf.mean(0) - fr.mean(0)).norm()),
           "mean_nearest_distance": float(nearest.mean()), "states_each": int(tf.shape[0])}
    g = torch.Generator().manual_seed(0)
    pick = lambda s: s[torch.randperm(s.shape[0], generator=g)[:points]]  # noqa: E731
    a, b = pick(tf), pick(fr)
    from sklearn.manifold import TSNE

    emb = TSNE(n_components=2, init="pca", random_state=0, perplexity=min(30, len(a) - 1)).fit_transform(
        torch.cat([a, b]).numpy())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.6))
    ax.scatter(emb[: len(a), 0], emb[: len(a), 1], s=3, alpha=0.5, label="teacher-forced")
    ax.scatter(emb[len(a):, 0], emb[len(a):, 1], s=3, alpha=0.5, label="free-running")
    ax.legend(markerscale=4, fontsize=8)
    ax.set_title(textwrap.fill(title, 60), fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return out


@torch.no_grad()
def long_run_drift(gen: GRUGenerator, x: torch.Tensor, runs: Any, length: int) -> list[dict[str, float]]:
    """Free runs far beyond the training length, cut into segments of ``length`` steps: per segment, the mean
    distance from each free-running state to its nearest teacher-forced state (teacher-forced on the test
    sequences ``x``, in state space) and the mean entropy of the next-character distribution in bits. A run
    that stays coherent keeps both near the first segment's values; one that drifts off the data's states
    moves away, one that degenerates into repetition loses entropy."""
    tf = gen.teacher_forced(x).hidden.reshape(-1, gen.hidden_size)
    out = []
    for k in range(runs.hidden.shape[1] // length):
        part = slice(k * length, (k + 1) * length)
        states = runs.hidden[:, part].reshape(-1, gen.hidden_size)
        nearest = torch.cat([torch.cdist(chunk, tf).min(1).values for chunk in states.split(1024)])
        logp = torch.log_softmax(runs.logits[:, part], -1)
        entropy = -(logp.exp() * logp).sum(-1).mean() / math.log(2)
        out.append({"segment": k + 1, "mean_nearest_distance": float(nearest.mean()),
                    "entropy_bits": float(entropy)})
    return out


def batch_nll(gen: GRUGenerator) -> Any:
    """The validation score of ``train_best``: a block's summed NLL."""
    return lambda x: -gen.log_likelihood(x).sum()


def save_variant_curves(variant: str, metrics: list[dict[str, Any]], path: Path) -> None:
    """Training and validation NLL per epoch; for professor forcing, D's accuracy and the fraction of steps
    each gate was open, on a right-hand axis."""
    gated = variant == "professor"
    names = {"D accuracy": "professor/accuracy", "generator gate open": "professor/gate_generator",
             "D gate open": "professor/gate_discriminator"}
    rows = [{"epoch": r["epoch"], "train NLL": r["train_loss"], "valid NLL": -r["valid_bound"],
             **({k: r.get(v) for k, v in names.items()} if gated else {})} for r in metrics]
    save_curves(rows, ["train NLL", "valid NLL"], path, ylabel="nats per sequence",
                title=f"{variant} forcing: NLL per epoch" + (" (right: D's accuracy, gates open)" if gated
                                                             else ""),
                secondary=list(names) if gated else (), secondary_label="fraction of steps")


def run(config: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    seqs = sequences(config, ctx)
    ev, unit = config["eval"], seqs["unit"]
    L = seqs["test"].shape[1]
    variants: dict[str, Any] = {}
    per_sequence: dict[str, torch.Tensor] = {}
    for variant in config["variants"]:
        pyro.set_rng_seed(config["seed"])  # the same start for both variants
        gen = build(config, seqs).to(ctx.device)
        p = config["professor"]
        extras = [] if variant == "teacher" else [ProfessorForcing(
            gen, p["hidden"], p["mlp"], p["lr"], p["weight"], p["teacher_term"], p["generator_gate"],
            p["freeze_gate"])]
        out = ctx.out / variant
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        resume = ctx.resume and (out / "checkpoint.pt").is_file()
        fit = train_best(gen, Trace_ELBO(), batch_nll(gen), config, seqs["train"].to(ctx.device),
                         seqs["transform"], (seqs["valid"].to(ctx.device),), out, ctx.device, resume,
                         ctx.progress, extras=extras)
        seconds = time.time() - t0
        if extras:  # D's accuracy and both gates at every step (metrics.jsonl holds the epoch means)
            text = "".join(json.dumps(row) + "\n" for row in extras[0].history)
            atomic_write(out / "gates.jsonl", lambda f, t=text: f.write(t), binary=False)
        pyro.set_rng_seed(config["seed"] + 1)
        nll = test_nll(gen, seqs["test"].to(ctx.device), ev["batch_size"])
        summary = nll_summary(nll)
        scale = 1 / (L * math.log(2)) if unit == "bits per character" else 1.0
        per_sequence[variant] = nll * scale
        result = {"test_nll": summary["nll"] * scale, "test_nll_stderr": summary["stderr"] * scale,
                  "test_sequences": int(nll.numel()), "unit": unit, "evaluated_epoch": fit["evaluated_epoch"],
                  "epochs": fit["epochs"], "updates": fit["updates"], "seconds_this_process": seconds}
        result["states"] = state_comparison(
            gen, seqs["test"][: ev["state_sequences"]].to(ctx.device), ev["tsne_points"],
            ctx.out / f"states_{variant}.png",
            f"{variant} forcing: hidden states of {ev['state_sequences']} test sequences, teacher-forced and "
            f"free-running (t-SNE of {ev['tsne_points']} each)")
        with torch.no_grad():
            if "corpus" in seqs:
                runs = gen.free_running(ev["num_samples"], ev["sample_factor"] * L)
                text = "\n\n----\n\n".join(seqs["corpus"].decode(r) for r in runs.x.cpu())
                write_text(ctx.out / f"samples_{variant}.txt", text)
                result["samples"] = {"num": ev["num_samples"], "length": ev["sample_factor"] * L}
                result["long_run"] = long_run_drift(gen, seqs["test"][: ev["state_sequences"]].to(ctx.device),
                                                    runs, L)
            else:
                images = torch.sigmoid(gen.free_running(ev["num_samples"], L).logits).cpu()
                save_image_grid(images, seqs["shape"], ctx.out / f"samples_{variant}.png",
                                title=f"{variant} forcing: free-running samples, whole images (pixel "
                                      "probabilities given the sampled pixels before them)")
                result["samples"] = {"num": ev["num_samples"], "length": L}
        variants[variant] = result
        write_json(out / "result.json", {"experiment": EXPERIMENT, "variant": variant, "config": config,
                                         "results": result})
        save_variant_curves(variant, fit["metrics"], ctx.out / f"curves_{variant}.png")
    out = {"experiment": EXPERIMENT, "config": config, "data": seqs["describe"], "variants": variants,
           "device": ctx.device, "torch": torch.__version__}
    if set(per_sequence) == set(VARIANTS):  # the same test sequences: the paired difference is the sharp test
        diff = per_sequence["professor"] - per_sequence["teacher"]
        out["paired_difference"] = {**nll_summary(diff), "unit": unit,
                                    "fraction_professor_lower": float((diff < 0).double().mean())}
    write_report(ctx.out, "results", out, render_markdown(out), config=config, command=ctx.command)
    return out


def render_markdown(r: dict[str, Any]) -> str:
    c, v = r["config"], r["variants"]
    rows = [[name, f"{x['test_nll']:.4f} ± {x['test_nll_stderr']:.4f} ({x['unit']})", x["test_sequences"],
             f"{x['evaluated_epoch']} of {x['epochs']}", f"{x['states']['centroid_distance']:.3f}",
             f"{x['states']['mean_nearest_distance']:.3f}"] for name, x in v.items()]
    d = c["data"]
    if d["kind"] == "text":
        what = (f"characters of {r['data'].get('source')} ({r['data'].get('alphabet_size')} symbols), "
                f"sequences of {d['seq_len']}")
    else:
        what = f"{c['dataset']} binarised, {r['data']['image_shape']} pixels read in order"
    if d["max_train"] or d["max_eval"]:
        what += (f"; capped to the first {d['max_train'] or 'all'} training and {d['max_eval'] or 'all'} "
                 "validation and test sequences")
    split = r["data"].get("split_protocol", r["data"].get("splits"))
    header = ["variant", "test NLL ↓", "test sequences", "evaluated epoch", "state centroid distance ↓",
              "free-running to nearest teacher-forced state ↓"]
    paired = ""
    if "paired_difference" in r:
        p = r["paired_difference"]
        paired = (f"Paired over the same test sequences: professor − teacher = {p['nll']:+.5f} ± "
                  f"{p['stderr']:.5f} ({p['unit']}; ± the standard error of the per-sequence differences), "
                  f"professor lower on {100 * p['fraction_professor_lower']:.1f} % of the {p['num']} "
                  "sequences.")
    drift = ""
    if v and all("long_run" in x for x in v.values()):
        segs = [s["segment"] for s in next(iter(v.values()))["long_run"]]
        drows = [[f"{name}: nearest teacher-forced state ↓",
                  *(f"{s['mean_nearest_distance']:.3f}" for s in x["long_run"])] for name, x in v.items()]
        drows += [[f"{name}: next-character entropy (bits)",
                   *(f"{s['entropy_bits']:.3f}" for s in x["long_run"])] for name, x in v.items()]
        n_runs = next(iter(v.values()))["samples"]["num"]
        drift = "\n".join([
            f"## Free runs {len(segs)} × the training length", "",
            f"{n_runs} free runs of {len(segs)} × {d['seq_len']} characters per variant (the "
            f"samples_<variant>.txt files), cut into segments of {d['seq_len']}: per segment, the mean "
            "distance from each free-running state to its nearest teacher-forced state (the first "
            "eval.state_sequences test sequences) and the mean entropy of the next-character distribution. "
            "Coherent runs keep both level along the run.", "",
            markdown_table(["variant: quantity", *(f"segment {k}" for k in segs)], drows), ""])
    return "\n".join([
        f"# Teacher forcing and professor forcing — preset `{c['preset']}`", "",
        f"Data: {what}; split {split}.", "",
        markdown_table(header, rows), "", paired, "",
        "Both variants: the same seed and epochs; the epoch with the best validation NLL. Distances are in "
        "the GRU's state space (not t-SNE space), over the states of the first eval.state_sequences test "
        "sequences and as many free runs; the thesis' Fig. 2.3 numbers are of another kind (t-SNE space, "
        "another task): compare directions of change only.", "", drift])


PROFESSOR_EXPERIMENT = Experiment(name=EXPERIMENT, prog="python -m experiments.professor_forcing",
                                  description=__doc__, default_out=DEFAULT_OUT, run=run, add_args=add_args,
                                  prepare=prepare, summary=(("results.md", "results.json"),))


def main(argv: list[str] | None = None) -> int:
    return PROFESSOR_EXPERIMENT.main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
