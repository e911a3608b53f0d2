"""seed_everything: torch gets the stage's seed whether it is imported before or after."""

from __future__ import annotations

import subprocess
import sys


def _draw(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_torch_imported_after_seeding_starts_from_the_last_seed():
    seeded_first = _draw(
        "import sys\n"
        "from harness.core.seeding import seed_everything\n"
        "seed_everything(1)\n"
        "seed_everything(5)\n"
        "assert 'torch' not in sys.modules  # nothing imported it yet\n"
        "import torch\n"
        "print(torch.rand(4).tolist(), torch.randint(0, 10**6, (2,)).tolist())\n"
    )
    imported_first = _draw(
        "import torch\n"
        "from harness.core.seeding import seed_everything\n"
        "seed_everything(5)\n"
        "print(torch.rand(4).tolist(), torch.randint(0, 10**6, (2,)).tolist())\n"
    )
    unseeded = _draw("import torch\nprint(torch.rand(4).tolist(), torch.randint(0, 10**6, (2,)).tolist())\n")
    assert seeded_first == imported_first != unseeded


def test_a_seed_set_after_torch_was_imported_reseeds_it():
    draws = _draw(
        "from harness.core.seeding import seed_everything\n"
        "seed_everything(3)\n"
        "import torch\n"
        "a = torch.rand(2).tolist()\n"
        "seed_everything(3)\n"
        "print(a == torch.rand(2).tolist())\n"
    )
    assert draws.strip() == "True"
