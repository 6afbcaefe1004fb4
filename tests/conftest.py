"""Fixtures shared by the test modules."""

from __future__ import annotations

import os

import pyro
import pytest
import torch

# Tests train with Pyro's argument validation on (the Trainer's training step has it off by default).
os.environ.setdefault("SEQGEN_VALIDATE", "1")


@pytest.fixture
def float64_and_seed():
    """Float64 by default, Pyro's RNG seeded with 0 and an empty parameter store, for numerical checks;
    the default dtype is restored afterwards. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    torch.set_default_dtype(old)
