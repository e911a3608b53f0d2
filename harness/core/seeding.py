"""One seed feeds python's random, numpy and torch."""

from __future__ import annotations

import importlib.util
import random


def seed_everything(seed: int) -> None:
    random.seed(seed)
    if importlib.util.find_spec("numpy"):
        import numpy as np

        np.random.seed(seed % 2**32)
    if importlib.util.find_spec("torch"):
        import torch

        torch.manual_seed(seed)
