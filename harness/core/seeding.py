"""One seed feeds python's random, numpy and torch.

torch takes seconds to import and many stages never use it (nor does a cluster worker
that runs only such stages): it is seeded now when it is imported already, else the
moment it is imported, with the seed of the stage that imports it."""

from __future__ import annotations

import importlib.abc
import importlib.util
import random
import sys
from typing import Any


def seed_everything(seed: int) -> None:
    random.seed(seed)
    if importlib.util.find_spec("numpy"):
        import numpy as np

        np.random.seed(seed % 2**32)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)
    else:
        _seed_torch_on_import.seed = seed
        if _seed_torch_on_import not in sys.meta_path:
            sys.meta_path.insert(0, _seed_torch_on_import)


class _SeedTorchOnImport(importlib.abc.MetaPathFinder):
    """Finds torch as the other finders do, and seeds it once its module has run."""

    seed = 0

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torch":
            return None
        sys.meta_path.remove(self)  # torch is imported once: the other finders take it from here
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            run_module, seed = spec.loader.exec_module, self.seed

            def run_and_seed(module: Any) -> None:
                run_module(module)
                module.manual_seed(seed)

            spec.loader.exec_module = run_and_seed
        return spec


_seed_torch_on_import = _SeedTorchOnImport()
