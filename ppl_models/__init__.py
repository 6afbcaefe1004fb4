"""seqgen's models (primary policies p) and guides (guide policies q), as Pyro model/guide pairs.

    from ppl_models import VAE, GPSI, LSTMImputer, DRAWGenerator, LinearGaussianChain
    from ppl_models import build_model, model_names      # the registry: build_model("gpsi-add", x_dim=784)

Every pair subclasses :class:`ModelGuidePair` (``ppl_models/base.py``): ``model``, ``guide``, ``sample(n)``,
``latent_sites``, ``guide_parameters()``, ``param_prefix``. Importing the package registers every model.

Site names follow one scheme: ``z_0``, ``z_1``, … for the steps and ``x`` for the observation, inside
``pyro.plate("data")``. Papers: Bachman & Precup (2015), "Data generation as sequential decision making"
(GPSI, Sec. 3.1; LSTM imputers, Sec. 3.2; DRAW-style generators, Sec. 2.4-2.5); Bachman & Precup (2015),
"Variational generative stochastic networks with collaborative shaping" (the self-looped VAE chain,
Sec. 3-6); Kingma & Welling (2014)
for the VAE; Mattei & Frellsen (2019) for MIWAE; the linear-Gaussian chain is the exact-answer reference.
"""

from ppl_models.base import ModelGuidePair, ModelSpec, build_model, model_names, model_spec, register_model
from ppl_models.conv_vae import ConvVAE
from ppl_models.diffusion import BernoulliDiffusion, DiffusionPair
from ppl_models.draw import DRAWGenerator
from ppl_models.gaussian_diffusion import GaussianDiffusion
from ppl_models.gcrl import GCRLGenerator
from ppl_models.gpsi import GPSI
from ppl_models.gru_generator import GRUGenerator
from ppl_models.gsn_chain import GSNChain
from ppl_models.imputation_policy import ImputationPolicy
from ppl_models.linear_gaussian import GuideParams, LinearGaussianChain
from ppl_models.lstm_imputer import LSTMImputer
from ppl_models.masks import MAR, MCAR, AllMissing, MaskProcess, UserMask, make_mask_process, validate_mask
from ppl_models.miwae import MIWAE, miwae_impute
from ppl_models.template_matching import template_match
from ppl_models.vae import VAE, vae_impute
from ppl_models.walkback import VariationalWalkback

__all__ = [
    "ConvVAE",
    "GCRLGenerator",
    "GRUGenerator",
    "ModelGuidePair",
    "ModelSpec",
    "build_model",
    "model_names",
    "model_spec",
    "register_model",
    "BernoulliDiffusion",
    "DiffusionPair",
    "GaussianDiffusion",
    "DRAWGenerator",
    "GPSI",
    "GSNChain",
    "GuideParams",
    "ImputationPolicy",
    "LSTMImputer",
    "LinearGaussianChain",
    "MAR",
    "MCAR",
    "MIWAE",
    "AllMissing",
    "MaskProcess",
    "UserMask",
    "VAE",
    "make_mask_process",
    "miwae_impute",
    "template_match",
    "validate_mask",
    "vae_impute",
    "VariationalWalkback",
]
