"""The one experiment runner: command line → configuration → build → train → score → report.

Every experiment is an :class:`Experiment` — its name (which names its presets file and its schema in
:mod:`experiments.config`), its default output directory, any options of its own, and a ``run`` function
that builds its model(s) from the registry (:mod:`ppl_models.base`), trains them with
:func:`experiments.common.train_best`, scores them with :mod:`inference.scoring` and writes its report with
:mod:`experiments.report`. :func:`main` does the rest the same way for all of them:

1. parse the command line (the common options of :func:`experiments.common.add_common_args`, including
   ``--set KEY=VALUE``, and the experiment's own);
2. resolve the configuration: the preset, validated against its schema, with the shorthands and every
   ``--set`` applied through one path (:func:`experiments.config.load_preset`);
3. resolve ``--device``, check ``--out`` (another run's results are refused unless ``--resume`` or
   ``--force``; it must be writable), record ``config.json`` (``--resume`` refuses changed settings);
4. call ``run(config, ctx)``; an error a user can cause ends with one line and exit status 2.

A new experiment is therefore a schema and presets file, a registered model and a short module::

    EXPERIMENT = Experiment(name="mine", prog="python -m experiments.mine", description=__doc__,
                            default_out="runs/mine", run=run)

    def main(argv=None):
        return EXPERIMENT.main(argv)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.common import Parser, add_common_args, resolve_config, run_experiment
from experiments.report import reproduce_command
from inference.distributed import is_writer


@dataclass
class RunContext:
    """What ``run`` gets beside the configuration: where to write, on which device, and the options that
    are not configuration (``args`` holds the experiment's own)."""

    out: Path
    device: str
    resume: bool
    progress: bool
    data_dir: str | None
    args: argparse.Namespace
    #: The command line that reruns this run (device and --out pinned), for its report.
    command: str


@dataclass
class Experiment:
    """One runnable experiment (see the module docstring).

    ``add_args`` adds the experiment's own options; ``prepare(config, args, parser)`` may complete the
    configuration from them (what it adds is recorded and compared on ``--resume`` like any setting) and
    may reject a combination with ``parser.error``; ``resumable`` are key prefixes a resumed run may
    change; ``more_epochs_retrain`` says the experiment trains the extra epochs of a resumed run with a
    constant learning rate (see :func:`experiments.common.record_config`); ``summary`` lists (page, data)
    file pairs: the first page found is printed at the end, with where its data is; ``default_step`` is the
    training step of a new run without ``--step`` (``"fused"``; ``"svi"`` where the objective needs it)."""

    name: str
    prog: str
    description: str
    default_out: str
    run: Callable[[dict[str, Any], RunContext], Any]
    add_args: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    prepare: Callable[[dict[str, Any], argparse.Namespace, argparse.ArgumentParser], None] | None = None
    resumable: Sequence[str] = ()
    more_epochs_retrain: bool = False
    summary: Sequence[tuple[str, str]] = (("results.md", "results.json"),)
    #: The training step of a new run without ``--step`` (:func:`experiments.common.resolve_step`).
    default_step: str = "fused"

    def build_parser(self) -> argparse.ArgumentParser:
        parser = Parser(prog=self.prog, description=self.description.strip().split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
        add_common_args(parser, self.name, self.default_out, self.default_step)
        self.add_args(parser)
        return parser

    def main(self, argv: list[str] | None = None) -> int:
        parser = self.build_parser()
        args = parser.parse_args(argv)
        try:
            config = resolve_config(self.name, args)
        except ValueError as e:
            parser.error(str(e))
        if self.prepare is not None:
            self.prepare(config, args, parser)

        def work(out: Path, device: str) -> None:
            command = reproduce_command(self.prog.split()[-1], sys.argv[1:] if argv is None else argv, out,
                                        device, config.get("train_step"))
            self.run(config, RunContext(out, device, args.resume, not args.no_progress, args.data_dir, args,
                                        command))
            for page, data in self.summary if is_writer() else ():
                if (out / page).is_file():
                    print((out / page).read_text())
                    print(f"results: {out / data}", file=sys.stderr)
                    break

        return run_experiment(args, self.default_out, config, work, resumable=self.resumable,
                              more_epochs_retrain=self.more_epochs_retrain)
