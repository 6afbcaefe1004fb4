"""Draw samples from a trained generative model.

    python -m experiments.sample --run RUN_DIR --n N --out DIR

Works for every run :func:`experiments.runs.load_run` can load (the VAE, the sequential generators, the
variational-GSN chains, the diffusion forms — a form's directory, e.g.
``results/diffusion-cpu-gaussian/gaussian``, sampled with all T steps — the goal-conditioned RL generator
and its convolutional VAE baseline (an ``experiments.gcrl`` run's ``agent/`` and ``vae/``: the S-agent alone
samples, Alg. 3) and the imputation policies run unconditionally, every pixel missing), and needs no data.
Writes into ``--out``:

* ``samples.npy``: float32, shape (N, H, W): the decoder means of p's final step for N independent draws (a
  Bernoulli decoder's are probabilities of a pixel being on, not binary draws: threshold or
  ``np.random.binomial`` them for those; the variational-GSN chain's are grey levels);
* ``samples.png``: the same as a grid;
* ``samples.json``: the run, its registered model, N, the seed and the device.

An existing ``samples.npy`` in ``--out`` is not overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyro

from experiments.common import Parser, non_negative_int, positive_int
from experiments.report import save_image_grid, write_json
from experiments.runs import load_run


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m experiments.sample",
        description="Draw N samples from a trained generative model (no data needed).",
    )
    parser.add_argument("--run", required=True, help="a finished run's output directory (holds best.pt and "
                        "result.json or results.json), e.g. results/draw-cpu/extended-add")
    parser.add_argument("--n", type=positive_int, default=64, help="number of samples, >= 1 (default 64)")
    parser.add_argument("--out", required=True, help="directory for samples.npy, samples.png, samples.json")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed, >= 0 (default 0)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--force", action="store_true", help="overwrite samples already in --out")
    return parser


OUTPUTS = ("samples.npy", "samples.png", "samples.json")


def run(run_dir: str, n: int, out: Path, seed: int, device: str, force: bool) -> dict:
    """Sample and write the three files; returns what samples.json records."""
    held = [name for name in OUTPUTS if (out / name).exists()]
    if held and not force:
        raise FileExistsError(f"--out {out} already holds {', '.join(held)}; pass --force to overwrite")
    loaded = load_run(run_dir, device)
    out.mkdir(parents=True, exist_ok=True)
    pyro.set_rng_seed(seed)
    images = loaded.module.sample(n).detach().cpu().float()
    array = images.reshape(n, *loaded.image_shape).numpy()
    np.save(out / "samples.npy", array)
    title = f"{n} samples of {loaded.model_name} ({loaded.dataset}), decoder means, seed {seed}"
    save_image_grid(images, loaded.image_shape, out / "samples.png", title=title)
    record = {"run": str(run_dir), "model": loaded.model_name, "dataset": loaded.dataset, "n": n,
              "seed": seed, "device": str(next(loaded.module.parameters()).device),
              "values": "decoder means of the final step (Bernoulli: σ(logits)), float32, shape (N, H, W)"}
    write_json(out / "samples.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = run(args.run, args.n, Path(args.out), args.seed, args.device, args.force)
    except (FileNotFoundError, FileExistsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{record['n']} samples of {record['model']} written to {args.out}/samples.npy and samples.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
