"""Experiment configuration: one preset schema for every experiment, validated on load, and one override path.

A preset is a named configuration in ``experiments/presets/<experiment>.json``. Every experiment's presets
follow one layout — a few top-level keys every experiment has (``about``, ``seed``, ``dataset``,
``eval_limit``) and nested sections (``train``, ``eval``, the model's sizes, ...) — described by a typed
schema below (:class:`VAEPreset`, :class:`DrawPreset`, :class:`ImputationPreset`, registered in
:data:`SCHEMAS`). Loading a preset merges it into its schema, so an unknown or misspelt key, a value of the
wrong type, a missing key or a number out of range is an error that names the key and what is allowed.

Overrides take one path: ``--set train.epochs=5`` (dotted keys, values typed by the schema, several
``--set`` allowed), and the common shorthands (``--epochs``, ``--lr``, ``--batch-size``, ``--seed``, ...) are
turned into the same dotted assignments (:data:`Preset.SHORTHANDS`). The result is a plain ``dict``, which
is what the experiments read and what each run records in its ``config.json``.

Why OmegaConf: it gives typed structured configs from dataclasses (the schema is the documentation and the
validator), dotted-list overrides typed from that schema, and helpful key errors ("did you mean
'epochs'?"); Hydra and many Lightning projects are built on it, so its override syntax is familiar to the
researchers who use this library. Hydra itself would also take over the working directory, logging and the
command line, which our experiments already define.

Adding an experiment: a schema class here (subclass :class:`Preset`, register it in :data:`SCHEMAS`), its
presets file, its model registered in :mod:`ppl_models.base`, and a short module on
:mod:`experiments.runner`.
"""

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A preset or an override that does not fit its experiment's schema."""


# ------------------------------------------------------------------------------------------ field kinds


def _req(minimum: float | None = None, *, exclusive: bool = False, default: Any = MISSING) -> Any:
    """A schema field, required unless ``default`` is given; numbers >= ``minimum`` (> with ``exclusive``;
    for a list, every element)."""
    return field(default=default, metadata={"minimum": minimum, "exclusive": exclusive})


def at_least(minimum: int, default: Any = MISSING) -> Any:
    return _req(minimum, default=default)


def positive(default: Any = MISSING) -> Any:
    return _req(0, exclusive=True, default=default)


def required() -> Any:
    return _req()


def one_of(*choices: str, default: Any = MISSING) -> Any:
    """A string field that must be one of ``choices``."""
    return field(default=default, metadata={"choices": choices})


# ------------------------------------------------------------------------------------------- sections


@dataclass
class Train:
    """Training: ``epochs`` passes of minibatches of ``batch_size``; Adam from ``lr`` decayed per update
    (exponentially) to ``lr_final`` at the last planned update, with ``betas``; the global L2 norm of the
    batch-summed loss's gradient clipped to ``clip_norm`` (null: not clipped); model selection on the first
    ``valid_limit`` validation images."""

    epochs: int = at_least(1)
    batch_size: int = at_least(1)
    lr: float = positive()
    lr_final: float = positive()
    clip_norm: float | None = positive()  # null: no clipping
    valid_limit: int = at_least(1)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98], metadata={"minimum": 0})


@dataclass
class VAERef:
    """The VAE of experiments.vae that an experiment reuses: a ``best.pt`` at ``checkpoint`` if it exists,
    else trained with that experiment's preset ``preset``."""

    checkpoint: str | None = required()
    preset: str = required()


@dataclass
class Preset:
    """What every experiment's preset has at its top level."""

    #: One line shown in --help.
    about: str = ""
    seed: int = at_least(0)
    #: A data set of experiments.data: digits or fashion-mnist.
    dataset: str = required()
    #: Score only the first N test images (0 = all).
    eval_limit: int = at_least(0)

    #: Command-line shorthands (argparse dest) and the dotted key each sets.
    SHORTHANDS: ClassVar[dict[str, str]] = {
        "seed": "seed", "eval_limit": "eval_limit", "epochs": "train.epochs", "lr": "train.lr",
        "lr_final": "train.lr_final", "batch_size": "train.batch_size",
    }


@dataclass
class VAEModel:
    z_dim: int = at_least(1)
    hidden: list[int] = _req(1)


@dataclass
class ScoreEval:
    """``bound_draws`` single-sample bounds per image on every scored image (batches of ``batch_size``);
    IWAE-``iw_samples`` on the first ``iw_limit`` (0 = all), ``iw_batch`` images × ``iw_chunk`` samples."""

    batch_size: int = at_least(1)
    bound_draws: int = at_least(1)
    iw_samples: int = at_least(1)
    iw_limit: int = at_least(0)
    iw_batch: int = at_least(1)
    iw_chunk: int = at_least(1)


@dataclass
class VAEEval(ScoreEval):
    """The scoring of :class:`ScoreEval`, and a bound ladder on the first ``ladder_images`` test images
    (0 = none)."""

    ladder_images: int = at_least(0)


@dataclass
class VAEPreset(Preset):
    """experiments.vae: an MLP VAE with a Bernoulli decoder."""

    model: VAEModel = field(default_factory=VAEModel)
    train: Train = field(default_factory=Train)
    eval: VAEEval = field(default_factory=VAEEval)

    SHORTHANDS: ClassVar[dict[str, str]] = {**Preset.SHORTHANDS, "z_dim": "model.z_dim",
                                            "hidden": "model.hidden", "iw_samples": "eval.iw_samples"}


@dataclass
class LSTMSizes:
    """Sizes of the LSTM policies: ppl_models.draw.DRAWGenerator and the LSTM imputer (z_0 in R^z0_dim,
    z_t in R^z_dim, LSTMs of lstm_dim units, mixture networks of mix_hidden, num_steps steps)."""

    z_dim: int = at_least(1)
    z0_dim: int = at_least(1)
    lstm_dim: int = at_least(1)
    mix_hidden: int = at_least(1)
    num_steps: int = at_least(1)


@dataclass
class Finetune:
    """Guide-only fine-tuning on the scored images: ``epochs`` passes (0 = none)."""

    epochs: int = at_least(0)
    batch_size: int = at_least(1)
    lr: float = positive()


@dataclass
class DrawPreset(Preset):
    """experiments.draw: the sequential generators of Sec. 2.4-2.5 and the foundation VAE."""

    variants: list[str] = required()
    generator: LSTMSizes = field(default_factory=LSTMSizes)
    train: Train = field(default_factory=Train)
    eval: ScoreEval = field(default_factory=ScoreEval)
    finetune: Finetune = field(default_factory=Finetune)
    vae: VAERef = field(default_factory=VAERef)

    SHORTHANDS: ClassVar[dict[str, str]] = {**Preset.SHORTHANDS, "num_steps": "generator.num_steps",
                                            "iw_samples": "eval.iw_samples",
                                            "finetune_epochs": "finetune.epochs"}


@dataclass
class GPSISizes:
    z_dim: int = at_least(1)
    hidden: list[int] = _req(1)
    num_steps: int = at_least(1)


@dataclass
class MIWAESizes:
    z_dim: int = at_least(1)
    hidden: list[int] = _req(1)
    #: K of the IWAE-K training objective on the known pixels.
    train_particles: int = at_least(1)


@dataclass
class ImputationEval(ScoreEval):
    """The scoring of :class:`ScoreEval` (on the missing pixels), and: MSE of ``mse_rollouts`` roll-outs;
    VAE imputation with ``vae_runs`` runs of ``vae_steps`` steps; MIWAE's estimate with ``miwae_samples``
    samples."""

    mse_rollouts: int = at_least(1)
    vae_runs: int = at_least(1)
    vae_steps: int = at_least(1)
    miwae_samples: int = at_least(1)


@dataclass
class SweepEval:
    """Scoring settings of the sweep's cells that differ from the preset's ``eval`` (null: the same)."""

    bound_draws: int | None = at_least(1, default=None)
    iw_limit: int | None = at_least(0, default=None)


@dataclass
class Sweep:
    """Fig. 2(c): GPSI with each number of refinement ``steps`` and canvas update, under ``mask``."""

    mask: str = required()
    steps: list[int] = _req(1)
    updates: list[str] = required()
    epochs: int = at_least(1)
    eval: SweepEval = field(default_factory=SweepEval)


@dataclass
class Table:
    """What experiments.imputation_table runs: every method under every mask, the roll-out figure's mask
    and the sweep."""

    masks: list[str] = required()
    methods: list[str] = required()
    rollout_mask: str = required()
    sweep: Sweep = field(default_factory=Sweep)


@dataclass
class ImputationPreset(Preset):
    """experiments.imputation and experiments.imputation_table (Sec. 3 and 9.2)."""

    #: Refinement steps of every policy in place of its family's (the sweep sets it); null: the family's.
    num_steps: int | None = at_least(1, default=None)
    gpsi: GPSISizes = field(default_factory=GPSISizes)
    lstm: LSTMSizes = field(default_factory=LSTMSizes)
    miwae: MIWAESizes = field(default_factory=MIWAESizes)
    vae: VAERef = field(default_factory=VAERef)
    train: Train = field(default_factory=Train)
    eval: ImputationEval = field(default_factory=ImputationEval)
    table: Table = field(default_factory=Table)

    SHORTHANDS: ClassVar[dict[str, str]] = {**Preset.SHORTHANDS, "num_steps": "num_steps",
                                            "iw_samples": "eval.iw_samples"}


@dataclass
class GSNModel:
    """ppl_models.gsn_chain.GSNChain: z in R^z_dim, MLPs of ``hidden``, the reconstruction distribution, what
    the chain feeds forward, and the Gaussian form's initial shared log-variance."""

    z_dim: int = at_least(1)
    hidden: list[int] = _req(1)
    likelihood: str = one_of("bernoulli", "gaussian")
    feed: str = one_of("mean", "sample")
    init_log_var: float = required()


@dataclass
class GSNTrain(Train):
    """:class:`Train`, with ``q_samples`` draws of q per example in every update (vectorised particles)."""

    q_samples: int = at_least(1)


@dataclass
class GSNUnroll(GSNTrain):
    """The phase after pre-training: guided variants unroll the chain ``steps`` steps (walkback variants walk
    ``steps`` steps); one-step variants keep training the VAE with the same schedule. ``bptt``: the later
    steps' free energies back-propagate through the chain points (else only L_g does)."""

    steps: int = at_least(1)
    bptt: bool = True


@dataclass
class ORKWeights:
    """Eq. 5: λ·KL + β·([KL − K̄]_+)², λ = ``kl_weight``, β = ``penalty`` (the ORK variants)."""

    kl_weight: float = _req(0)
    penalty: float = _req(0)


@dataclass
class GuideF:
    """The guide function f (a maxout net of ``hidden`` units in groups of ``pieces``, outputs bounded by
    ``bound``; Adam ``lr``; ``f_penalty``·mean(f²)) and L_g (``lg_weight`` × the elastic-net hinge with
    ``linear`` and ``quadratic`` parts)."""

    hidden: list[int] = _req(1)
    pieces: int = at_least(1)
    bound: float | None = positive()
    lr: float = positive()
    lg_weight: float = _req(0)
    f_penalty: float = _req(0)
    linear: float = _req(0)
    quadratic: float = _req(0)


@dataclass
class GSNEval(ScoreEval):
    """The one-step bound and IWAE (:class:`ScoreEval`); Parzen with ``parzen_samples`` centres, σ from
    ``parzen_grid`` on the first ``parzen_valid`` validation images; FD-classifier of ``fd_samples`` samples
    against the first ``fd_reference`` images of train and test; chain drift from ``chain_starts`` training
    images at ``chain_steps``; curves every ``curve_every`` epochs (Parzen with ``curve_parzen_samples``
    centres on ``curve_valid`` validation images; the Fig. 4(c) scatter on ``scatter_points``); figures of
    ``figure_chains`` chains × ``figure_frames`` frames (every ``figure_every``-th step; partial control under
    ``partial_mask``, every ``partial_every``-th step)."""

    parzen_samples: int = at_least(2)
    parzen_valid: int = at_least(2)
    parzen_grid: list[float] = positive()
    fd_samples: int = at_least(2)
    fd_reference: int = at_least(2)
    chain_starts: int = at_least(2)
    chain_steps: list[int] = _req(1)
    curve_every: int = at_least(1)
    curve_parzen_samples: int = at_least(2)
    curve_valid: int = at_least(4)
    scatter_points: int = at_least(1)
    figure_chains: int = at_least(1)
    figure_frames: int = at_least(1)
    figure_every: int = at_least(1)
    partial_mask: str = required()
    partial_every: int = at_least(1)


@dataclass
class GSNPreset(Preset):
    """experiments.gsn: variational simple GSNs with collaborative shaping (ORK / VAR, guided / one-step)."""

    #: <objective>-<phase>: objective var (Eq. 2) or ork (Eq. 5); phase guided, unrolled, onestep or walkback.
    variants: list[str] = required()
    model: GSNModel = field(default_factory=GSNModel)
    pretrain: GSNTrain = field(default_factory=GSNTrain)
    unroll: GSNUnroll = field(default_factory=GSNUnroll)
    ork: ORKWeights = field(default_factory=ORKWeights)
    guide_f: GuideF = field(default_factory=GuideF)
    eval: GSNEval = field(default_factory=GSNEval)

    #: Two training phases: --epochs/--lr/--batch-size would be ambiguous, so they are --set keys here.
    SHORTHANDS: ClassVar[dict[str, str]] = {"seed": "seed", "eval_limit": "eval_limit"}


@dataclass
class BernoulliDiffusionSizes:
    """ppl_models.diffusion.BernoulliDiffusion: T = ``num_steps``, the denoiser MLP's ``hidden`` sizes and
    step embedding ``embed_dim``; samples drawn with ``sample_steps`` strided steps (null: all T)."""

    num_steps: int = at_least(1)
    hidden: list[int] = _req(1)
    embed_dim: int = at_least(2)
    sample_steps: int | None = at_least(2)


@dataclass
class GaussianDiffusionSizes:
    """ppl_models.gaussian_diffusion.GaussianDiffusion: T = ``num_steps`` (Ho's linear β schedule), the U-Net
    (``channels`` × ``mult`` per level, ``groups`` group-norm groups, step embedding ``embed_dim``), the
    model's step variance (β or β̃); samples drawn with ``sample_steps`` strided DDIM steps of η = ``eta``
    (null: all T ancestral steps)."""

    num_steps: int = at_least(1)
    channels: int = at_least(1)
    mult: list[int] = _req(1)
    groups: int = at_least(1)
    embed_dim: int = at_least(2)
    variance: str = one_of("beta", "beta_tilde")
    eta: float = _req(0)
    sample_steps: int | None = at_least(2)


@dataclass
class DiffusionTrain(Train):
    """:class:`Train`, with the loss: ``bound`` (the subsampled path-wise bound, one step per image) or
    ``simple`` (Ho's L_simple; Gaussian form only). A fixed number of updates; the last weights are
    evaluated."""

    loss: str = one_of("bound", "simple")


@dataclass
class DiffusionEval:
    """The test bound with every time step visited (one x_t draw each) on the first ``bernoulli_images`` /
    ``gaussian_images`` test images (0 = all), batches of ``batch_size``; ``fd_samples`` samples scored by
    FD-classifier against the first ``fd_reference`` training and test images and by a Parzen window
    (σ from ``parzen_grid`` on the first ``parzen_valid`` validation images); figures of ``grid_samples``
    samples, ``trajectory_chains`` denoising trajectories of ``trajectory_frames`` frames, and inpainting of
    ``inpaint_images`` test images under the mask ``inpaint_mask``."""

    batch_size: int = at_least(1)
    bernoulli_images: int = at_least(0)
    gaussian_images: int = at_least(0)
    fd_samples: int = at_least(2)
    fd_reference: int = at_least(2)
    parzen_valid: int = at_least(2)
    parzen_grid: list[float] = positive()
    grid_samples: int = at_least(1)
    trajectory_chains: int = at_least(1)
    trajectory_frames: int = at_least(1)
    inpaint_images: int = at_least(1)
    inpaint_mask: str = required()


@dataclass
class DiffusionPreset(Preset):
    """experiments.diffusion: Bernoulli (bit-flip) and Gaussian (DDPM) diffusion as model/guide pairs."""

    #: which forms to train and score: bernoulli (binarised images), gaussian (grey levels)
    forms: list[str] = required()
    bernoulli: BernoulliDiffusionSizes = field(default_factory=BernoulliDiffusionSizes)
    gaussian: GaussianDiffusionSizes = field(default_factory=GaussianDiffusionSizes)
    train_bernoulli: DiffusionTrain = field(default_factory=DiffusionTrain)
    train_gaussian: DiffusionTrain = field(default_factory=DiffusionTrain)
    eval: DiffusionEval = field(default_factory=DiffusionEval)

    #: Two training sections: --epochs/--lr/--batch-size would be ambiguous, so they are --set keys here.
    SHORTHANDS: ClassVar[dict[str, str]] = {"seed": "seed", "eval_limit": "eval_limit"}


@dataclass
class WalkbackSizes:
    """ppl_models.walkback.VariationalWalkback: F's ``hidden`` sizes, α = ``alpha``, T_max = ``t_max``,
    N1 = ``max_extra`` (walks of ceil(log2 T_max) … ceil(log2 T_max) + N1 steps); trained with ``update``
    "walk" (one step on the whole walk's bound) or "online" (Alg. 1: one step per walk step); p*'s moments
    moved towards the heated end states by ``star_momentum`` after each minibatch; ``norm`` "layer" or
    "batch" normalisation per temperature level; ``skip`` the Bernoulli operator's starting gain on 2s − 1."""

    hidden: list[int] = _req(1)
    alpha: float = _req(0, exclusive=True)
    t_max: float = _req(1)
    max_extra: int = at_least(0)
    update: str = one_of("walk", "online")
    star_momentum: float = _req(0, exclusive=True)
    norm: str = one_of("layer", "batch", default="layer")
    skip: float = _req(0, default=0.0)
    #: the walk lengths this form is scored at, with and without importance sampling (null: eval's)
    walk_steps: list[int] | None = _req(1, default=None)
    is_walk_steps: list[int] | None = _req(1, default=None)


@dataclass
class ToyData:
    """The 2-D toy: ``modes`` equal Gaussians of standard deviation ``sd`` on a circle of ``radius``;
    ``train`` / ``valid`` / ``test`` points drawn from the preset's seed."""

    modes: int = at_least(1)
    radius: float = _req(0)
    sd: float = positive()
    train: int = at_least(2)
    valid: int = at_least(2)
    test: int = at_least(2)


@dataclass
class WalkbackEval:
    """Bounds (one heated path per point, batches of ``batch_size``) on the first ``bound_images`` training
    and test points (0 = all) for every walk length in ``walk_steps`` (the rows of the thesis' Table 3.1a);
    the importance-sampled log-likelihood (Eq. 3.10) with ``is_samples`` paths (chunks of ``is_chunk``) on the
    first ``is_images`` points of each split, for the walk lengths ``is_walk_steps``; samples by cooling along
    the longest walk: ``fd_samples`` of them scored by FD-classifier against the first ``fd_reference``
    training and test images, then run ``long_run`` × K more steps at T = 1; reversibility (Sec. 3.14) over
    ``reversibility_steps`` steps after ``reversibility_burn_in`` in ``reversibility_chains`` chains; figures
    of ``grid_samples`` samples, ``walk_chains`` heating and cooling walks, inpainting of ``inpaint_images``
    test images under ``inpaint_mask``; the toy's learned density drawn on a ``toy_grid`` × ``toy_grid`` grid
    with ``toy_is_samples`` paths per point."""

    walk_steps: list[int] = _req(1)
    batch_size: int = at_least(1)
    bound_images: int = at_least(0)
    is_walk_steps: list[int] = _req(1)
    is_images: int = at_least(1)
    is_samples: int = at_least(1)
    is_chunk: int = at_least(1)
    fd_samples: int = at_least(2)
    fd_reference: int = at_least(2)
    long_run: int = at_least(10)
    reversibility_chains: int = at_least(2)
    reversibility_steps: int = at_least(1)
    reversibility_burn_in: int = at_least(0)
    grid_samples: int = at_least(1)
    walk_chains: int = at_least(1)
    inpaint_images: int = at_least(1)
    inpaint_mask: str = required()
    toy_grid: int = at_least(2)
    toy_is_samples: int = at_least(1)


@dataclass
class WalkbackPreset(Preset):
    """experiments.walkback: variational walkback on binarised images, grey levels and a 2-D toy."""

    #: which forms to train: bernoulli (binarised images), gaussian (dequantised grey levels), toy (2-D)
    forms: list[str] = required()
    bernoulli: WalkbackSizes = field(default_factory=WalkbackSizes)
    gaussian: WalkbackSizes = field(default_factory=WalkbackSizes)
    toy: WalkbackSizes = field(default_factory=WalkbackSizes)
    train_bernoulli: Train = field(default_factory=Train)
    train_gaussian: Train = field(default_factory=Train)
    train_toy: Train = field(default_factory=Train)
    toy_data: ToyData = field(default_factory=ToyData)
    eval: WalkbackEval = field(default_factory=WalkbackEval)

    #: One training section per form: --epochs/--lr/--batch-size would be ambiguous, so they are --set keys.
    SHORTHANDS: ClassVar[dict[str, str]] = {"seed": "seed", "eval_limit": "eval_limit"}


@dataclass
class SequenceData:
    """The sequences: ``kind`` "text" (characters of ``text_file``, null: the fortunes corpus, cut into
    non-overlapping sequences of ``seq_len``) or "pixels" (the preset's data set binarised and read pixel by
    pixel, block-averaged by ``downsample`` first: 1 keeps 28 x 28, 2 gives 14 x 14); ``max_train`` /
    ``max_eval`` cap the sequences used (0 = all)."""

    kind: str = one_of("text", "pixels")
    text_file: str | None = _req(default=None)
    seq_len: int = at_least(2)
    downsample: int = at_least(1)
    max_train: int = at_least(0)
    max_eval: int = at_least(0)


@dataclass
class GRUSizes:
    """ppl_models.gru_generator.GRUGenerator: the GRU's ``hidden`` size, the character ``embed`` size."""

    hidden: int = at_least(1)
    embed: int = at_least(1)


@dataclass
class ProfessorTerm:
    """inference.professor_forcing.ProfessorForcing: D's GRU ``hidden`` size and ``mlp`` width, its Adam
    ``lr``, the adversarial terms' ``weight``, C_t with ``teacher_term``, the gates (accuracies)."""

    hidden: int = at_least(1)
    mlp: int = at_least(1)
    lr: float = positive()
    weight: float = _req(0)
    teacher_term: bool = False
    generator_gate: float = _req(0)
    freeze_gate: float = _req(0)


@dataclass
class ProfessorEval:
    """Test NLL in batches of ``batch_size``; ``num_samples`` free runs of ``sample_factor`` × the training
    length (text) or of whole images (pixels); hidden states of ``state_sequences`` test sequences under
    teacher forcing against as many free runs, ``tsne_points`` of each drawn with t-SNE."""

    batch_size: int = at_least(1)
    num_samples: int = at_least(1)
    sample_factor: int = at_least(1)
    state_sequences: int = at_least(2)
    tsne_points: int = at_least(10)


@dataclass
class ProfessorForcingPreset(Preset):
    """experiments.professor_forcing: teacher against professor forcing, side by side from one seed."""

    #: which to train: teacher (NLL only), professor (NLL + C_f, + C_t with professor.teacher_term)
    variants: list[str] = required()
    data: SequenceData = field(default_factory=SequenceData)
    model: GRUSizes = field(default_factory=GRUSizes)
    train: Train = field(default_factory=Train)
    professor: ProfessorTerm = field(default_factory=ProfessorTerm)
    eval: ProfessorEval = field(default_factory=ProfessorEval)


@dataclass
class GCRLAgentSizes:
    """ppl_models.gcrl.GCRLGenerator: H ``steps``, A ``actions``; the proposal U-Net's ``channels`` per level
    times ``mult``, ``groups`` of group norm and the step/selection embedding ``embed_dim``; the selection and
    Q-networks' width ``select_channels``; κ ``kappa``, Sec. 3.2's exploration penalty."""

    steps: int = at_least(1)
    actions: int = at_least(2)
    channels: int = at_least(1)
    mult: list[int] = _req(1)
    groups: int = at_least(1)
    embed_dim: int = at_least(2)
    select_channels: int = at_least(1)
    kappa: float = _req(0)


@dataclass
class GCRLTrain:
    """Alg. 1-2 on the Trainer: ``epochs`` passes over the first ``max_train`` training images (0: all) as
    goals, minibatches of ``batch_size`` goals (one GC-agent trajectory each, then one update of each network
    on a replayed minibatch of the same size and one soft target update at rate ``rho``); Adam at ``lr`` for
    all three networks; the RL loss ℓ_H = ``loss_scale``·‖x_{H+1} − x̃‖²; replay buffers of ``capacity``
    transitions (R_GC-select, R_S-select) and ``trajectory_capacity`` trajectories (R_S-prop). After each
    epoch σ² is fit on the first ``sigma2_images`` training images and the bound is computed on the first
    ``valid_limit`` validation images (a curve: the last epoch is evaluated)."""

    epochs: int = at_least(1)
    batch_size: int = at_least(1)
    max_train: int = at_least(0)
    lr: float = positive()
    rho: float = positive()
    loss_scale: float = positive()
    capacity: int = at_least(1)
    trajectory_capacity: int = at_least(1)
    valid_limit: int = at_least(1)
    sigma2_images: int = at_least(1)


@dataclass
class ConvVAESizes:
    """ppl_models.conv_vae.ConvVAE: latent ``z_dim`` and ``channels`` per resolution level."""

    z_dim: int = at_least(1)
    channels: list[int] = _req(1)


@dataclass
class DiffusionRef:
    """The diffusion baseline, not retrained: the ``run`` directory of an experiments.diffusion Gaussian form
    (null: no diffusion row), sampled with ``sample_steps`` strided DDIM steps (null: all T ancestral)."""

    run: str | None = required()
    sample_steps: int | None = at_least(1)


@dataclass
class GCRLEval:
    """Table 1: MSE and FD-classifier of reconstructions of the first ``recon_images`` test images (0: all),
    FD-classifier of ``fd_samples`` samples of each method against the first ``fd_reference`` training and
    test images; the bound (nats) and IWAE-``iw_samples`` on the first ``bound_images`` test images, for the
    greedy GC-agent and the Boltzmann guide at each temperature of ``taus``; batches of ``batch_size``;
    ``trajectories`` S-agent trajectories from the same start for Fig. 2."""

    batch_size: int = at_least(1)
    recon_images: int = at_least(0)
    fd_samples: int = at_least(2)
    fd_reference: int = at_least(2)
    bound_images: int = at_least(1)
    iw_samples: int = at_least(1)
    taus: list[float] = positive()
    trajectories: int = at_least(1)


@dataclass
class GCRLPreset(Preset):
    """experiments.gcrl: the goal-conditioned RL generator against a convolutional VAE and the diffusion
    model (Vargas Vieyra & Ménard, Table 1)."""

    agent: GCRLAgentSizes = field(default_factory=GCRLAgentSizes)
    train: GCRLTrain = field(default_factory=GCRLTrain)
    vae: ConvVAESizes = field(default_factory=ConvVAESizes)
    train_vae: Train = field(default_factory=Train)
    diffusion: DiffusionRef = field(default_factory=DiffusionRef)
    eval: GCRLEval = field(default_factory=GCRLEval)

    #: Two training sections: --epochs/--lr/--batch-size would be ambiguous, so they are --set keys here.
    SHORTHANDS: ClassVar[dict[str, str]] = {"seed": "seed", "eval_limit": "eval_limit"}


#: Experiment name -> its preset schema.
SCHEMAS: dict[str, type[Preset]] = {"vae": VAEPreset, "draw": DrawPreset, "imputation": ImputationPreset,
                                    "gsn": GSNPreset, "diffusion": DiffusionPreset,
                                    "walkback": WalkbackPreset,
                                    "professor_forcing": ProfessorForcingPreset, "gcrl": GCRLPreset}


# --------------------------------------------------------------------------------------------- loading


def schema_of(experiment: str) -> type[Preset]:
    if experiment not in SCHEMAS:
        raise ConfigError(f"no preset schema for experiment {experiment!r}; known: {sorted(SCHEMAS)}")
    return SCHEMAS[experiment]


def raw_presets(experiment: str) -> dict[str, dict[str, Any]]:
    """The presets of ``experiment`` as written in its JSON file (keys starting with ``_`` are comments)."""
    path = PRESET_DIR / f"{experiment}.json"
    with open(path) as f:
        presets = json.load(f)
    return {k: v for k, v in presets.items() if not k.startswith("_")}


def load_preset(experiment: str, name: str, overrides: list[tuple[str, str]] = ()) -> dict[str, Any]:
    """Preset ``name`` of ``experiment``, validated against its schema, with ``overrides`` applied in order.

    ``overrides`` are ``(source, "dotted.key=value")`` pairs; ``source`` (e.g. ``--set`` or ``--epochs``)
    names where each came from in an error. Values are parsed as OmegaConf parses a dotted list (YAML
    scalars: ``5``, ``1e-3``, ``null``, ``[500,500]``) and converted to the key's type. Returns a plain
    dict with every key of the schema."""
    schema = schema_of(experiment)
    presets = raw_presets(experiment)
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r} for {experiment}; choose one of {sorted(presets)}")
    where = f"experiments/presets/{experiment}.json, preset {name!r}"
    cfg = OmegaConf.structured(schema)
    try:
        cfg = OmegaConf.merge(cfg, presets[name])
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {_explain(e, schema)}") from None
    for source, assignment in overrides:
        key, eq, value = assignment.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{source} {assignment!r}: expected KEY=VALUE with a dotted key, e.g. "
                              f"train.epochs=5")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key.strip()}={value}"]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source} {assignment}: {_explain(e, schema)}") from None
    try:
        config = OmegaConf.to_container(cfg, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{where}: missing key {e.full_key!r}; {_valid_keys(schema, e.full_key)}") from None
    problems = _range_problems(schema, config)
    if problems:
        origin = f"{where} with {', '.join(s + ' ' + a for s, a in overrides)}" if overrides else where
        raise ConfigError(f"{origin}: {'; '.join(problems)}")
    return config


def _explain(e: OmegaConfBaseException, schema: type) -> str:
    key = getattr(e, "full_key", None) or ""
    if isinstance(e, ConfigKeyError):
        return f"unknown key {key!r}; {_valid_keys(schema, key)}"
    if isinstance(e, ValidationError):
        return f"{key}: {str(e).splitlines()[0]}"
    return str(e).splitlines()[0]


def _valid_keys(schema: type, dotted: str) -> str:
    """'valid keys of <section>: a, b, c' for the section that holds ``dotted``."""
    cls, parts, found = schema, dotted.split(".")[:-1], []
    for part in parts:
        kind = _field_types(cls).get(part)
        if not dataclasses.is_dataclass(kind):
            break
        cls = kind
        found.append(part)
    section = ".".join(found) or "the top level"
    return f"valid keys of {section}: {', '.join(_field_types(cls))}"


def _field_types(cls: type) -> dict[str, Any]:
    """A schema class's fields and their types, in order (class variables left out)."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _range_problems(schema: type, config: dict[str, Any], prefix: str = "") -> list[str]:
    problems = []
    for f in dataclasses.fields(schema):
        value = config.get(f.name)
        kind = _field_types(schema)[f.name]
        if dataclasses.is_dataclass(kind):
            problems += _range_problems(kind, value, f"{prefix}{f.name}.")
            continue
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            problems.append(f"{prefix}{f.name} = {value!r} is not allowed: choose one of {list(choices)}")
        minimum = f.metadata.get("minimum")
        if minimum is None or value is None:
            continue
        values = value if isinstance(value, list) else [value]
        exclusive = f.metadata.get("exclusive", False)
        bad = [v for v in values if not (math.isfinite(v) and (v > minimum if exclusive else v >= minimum))]
        if bad:
            bound = f"> {minimum}" if exclusive else f">= {minimum}"
            what = "every element must be" if isinstance(value, list) else "must be"
            problems.append(f"{prefix}{f.name} = {value!r} is out of range: {what} {bound}")
    return problems


def describe_schema(experiment: str) -> str:
    """The dotted keys of an experiment's schema, one per line with its type, for ``--help``."""
    lines: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            kind = _field_types(cls)[f.name]
            if dataclasses.is_dataclass(kind):
                walk(kind, f"{prefix}{f.name}.")
            else:
                lines.append(f"{prefix}{f.name}")

    walk(schema_of(experiment), "")
    return ", ".join(lines)
