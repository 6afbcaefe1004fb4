"""Made results/walkback-cpu-bernoulli/bound_terms.{md,json}: run from the repository root with
.venv/bin/python results/walkback-cpu-bernoulli/bound_terms.py (needs the run's best.pt and checkpoint.pt,
which are not committed: rerun the cpu preset to make them)."""

import json

import torch

from experiments.data import fixed_binarize, load_dataset
from experiments.runs import load_run
from experiments.walkback import bound_terms
from inference.checkpoint import load_checkpoint

RUN = "results/walkback-cpu-bernoulli"
run = load_run(f"{RUN}/bernoulli")
x = fixed_binarize(load_dataset("fashion-mnist").valid[:300])
out = {}
CHECKPOINTS = (("epoch 2 (best.pt, evaluated)", "best.pt"),
               ("epoch 20 (checkpoint.pt, last)", "checkpoint.pt"))
for name, path in CHECKPOINTS:
    run.module.load_state_dict(load_checkpoint(f"{RUN}/bernoulli/{path}")["module"])
    run.module.eval()
    run.module.set_walk(10)
    torch.manual_seed(0)
    out[name] = bound_terms(run.module, x)
lines = ["# Where the bound is lost: Eq. 3.5 site by site (binarised Fashion-MNIST, cpu run)", "",
         "The first 300 validation images binarised once with seed 0, one heated path each, a 10-step walk "
         "(T = 1, 2, …, 512); mean nats per image. s_10's ln p is ln p*(s_10). Made by bound_terms.py "
         "beside this file (experiments.walkback.bound_terms on best.pt and the last checkpoint.pt).", ""]
for name, rows in out.items():
    lines += [f"## {name}", "", "| state | ln p | ln q | ln p − ln q |", "|---|---|---|---|"]
    lines += [f"| {r['state']} | {r['log_p']:.1f} | {r['log_q']:.1f} | {r['log_p'] - r['log_q']:.1f} |"
              for r in rows]
    lines += ["", f"Sum (the bound on these images): {sum(r['log_p'] - r['log_q'] for r in rows):.1f}", ""]
open(f"{RUN}/bound_terms.md", "w").write("\n".join(lines))
json.dump(out, open(f"{RUN}/bound_terms.json", "w"), indent=1)
print("\n".join(lines))
