"""seqgen's objectives, estimators, diagnostics and training driver.

Import them as Pyro users import ``pyro.infer``::

    from inference import PathwiseKL_ELBO, IWAE_ELBO, importance_log_likelihood

Objectives (one per module, the equation in its docstring): :class:`PathwiseKL_ELBO` (Bachman & Precup 2015,
"Data generation as sequential decision making", Eq. 17: negative ELBO with analytic one-step KLs where they
are valid), :class:`IWAE_ELBO` (Burda et al. 2016, the importance-weighted bound) and
:class:`OverRegularisedKL_ELBO` (Bachman & Precup 2015, "Variational generative stochastic networks with
collaborative shaping", Eq. 5); that paper's guide function and generator loss (Eqs. 6-7) are
:class:`CollaborativeShaping`, an :class:`ExtraTerm`. Estimators and
diagnostics: :func:`importance_log_likelihood`, :func:`log_importance_weights`, :func:`bound_ladder`, PSIS
k-hat and ESS; :func:`reliability` (the reliability diagram and expected calibration error of predicted
Bernoulli probabilities, Guo et al. 2017); sample quality (:func:`frechet_distance` in a classifier's
features, the "FD-classifier" of our tables, with the committed classifiers of :func:`load_fd_classifier`
and :func:`fd_scores`, :func:`mode_coverage`; :func:`parzen_log_likelihood`; :func:`class_entropy`).
Training: :class:`Trainer` (checkpoints, exact resume, the NaN stop), :class:`ExtraTerm` (extra losses with
their own optimisers) and :func:`finetune_guide` (q only, p frozen); variational walkback's online update
(:class:`OnlineWalkbackELBO`, Goyal 2017, Alg. 1) and its p* moment tracker (:class:`PStarMoments`).
Speed: :class:`ClippedAdam` (Pyro's ClippedAdam update as one torch optimiser over all parameters),
:class:`GraphedStep` (a training step captured in CUDA graphs) and :func:`host_syncs` (the calls of a step
that read the device back to the host).
"""

from inference.calibration import Reliability, reliability
from inference.collaborative import CollaborativeShaping, GuideFunction, generator_hinge, guide_function_loss
from inference.cuda_graph import GraphedStep, StepNotCapturable
from inference.diagnostics import (
    bound_ladder,
    check_ladder,
    degenerate_tails,
    effective_sample_size,
    iwae_ladder_from_weights,
    khat_summary,
    latent_samples_to_arviz,
    per_step_curves,
    psis_khat,
)
from inference.diffusion_elbo import SubsampledDiffusionELBO
from inference.diffusion_simple import SimpleDiffusionLoss
from inference.fd_classifier import FDClassifier, fd_scores, load_fd_classifier, mode_coverage
from inference.finetune import finetune_guide, frozen_except
from inference.host_sync import host_syncs
from inference.importance import ImportanceEstimate, importance_log_likelihood
from inference.iwae import (
    IWAE_ELBO,
    infer_data_plate,
    iter_log_weights,
    log_importance_weights,
    log_mean_exp,
    max_plate_nesting,
)
from inference.optim import ClippedAdam
from inference.ork_elbo import OverRegularisedKL_ELBO
from inference.pathwise_kl_elbo import (
    PathwiseKL_ELBO,
    PathwiseKLValidityError,
    SiteKind,
    analytic_kl,
    late_parents,
    same_weighting,
)
from inference.sample_quality import (
    class_entropy,
    frechet_distance,
    gaussian_frechet_distance,
    histogram_entropy,
    parzen_log_likelihood,
    reconstruction_mse,
    select_parzen_sigma,
)
from inference.train import (
    ExtraTerm,
    NonFiniteLossError,
    Trainer,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
)
from inference.walkback import OnlineWalkbackELBO, PStarMoments

__all__ = [
    "ClippedAdam",
    "GraphedStep",
    "StepNotCapturable",
    "host_syncs",
    "select_parzen_sigma",
    "reconstruction_mse",
    "parzen_log_likelihood",
    "gaussian_frechet_distance",
    "frechet_distance",
    "class_entropy",
    "histogram_entropy",
    "CollaborativeShaping",
    "GuideFunction",
    "OverRegularisedKL_ELBO",
    "SubsampledDiffusionELBO",
    "SimpleDiffusionLoss",
    "OnlineWalkbackELBO",
    "PStarMoments",
    "generator_hinge",
    "guide_function_loss",
    "ExtraTerm",
    "FDClassifier",
    "IWAE_ELBO",
    "ImportanceEstimate",
    "NonFiniteLossError",
    "PathwiseKLValidityError",
    "PathwiseKL_ELBO",
    "Reliability",
    "SiteKind",
    "Trainer",
    "analytic_kl",
    "atomic_write",
    "bound_ladder",
    "check_ladder",
    "degenerate_tails",
    "effective_sample_size",
    "fd_scores",
    "finetune_guide",
    "frozen_except",
    "importance_log_likelihood",
    "infer_data_plate",
    "iter_log_weights",
    "iwae_ladder_from_weights",
    "khat_summary",
    "late_parents",
    "latent_samples_to_arviz",
    "load_checkpoint",
    "load_fd_classifier",
    "log_importance_weights",
    "log_mean_exp",
    "max_plate_nesting",
    "mode_coverage",
    "per_step_curves",
    "psis_khat",
    "reliability",
    "same_weighting",
    "save_checkpoint",
]
