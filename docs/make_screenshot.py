"""Regenerate docs/report.png: the report.html of the tiny cubic_gravity run, in headless Chromium.

    python docs/make_screenshot.py                    # a fresh store in a temporary directory
    python docs/make_screenshot.py --runs-dir runs    # reuse a store: only stale stages run

Runs `pytest experiments/cubic_gravity.yaml --profile tiny` (minutes on a CPU; the tiny world
is built once and cached), screenshots the report 1280 pixels wide, and saves it with a
256-colour palette to keep it small. Needs Chromium (`apt-get install chromium`); CI does
not run this script.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "cubic_gravity.yaml"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
MAX_BYTES = 500_000  # what the repository keeps: a README image, not an archive


def browser() -> str:
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found is None:
        sys.exit(f"no browser found (tried {', '.join(BROWSERS)}): apt-get install chromium")
    return found


def run_experiment(runs_dir: Path) -> Path:
    """The tiny run's report.html in `runs_dir`; the run's own output goes to the terminal."""
    command = [sys.executable, "-m", "pytest", str(SPEC), "--profile", "tiny", "--runs-dir", str(runs_dir)]
    subprocess.run([*command, "-q", "-p", "no:cacheprovider"], cwd=ROOT, check=True)
    return runs_dir / "cubic_gravity" / "tiny" / "report.html"


def screenshot(report: Path, out: Path, width: int, height: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "report.png"
        subprocess.run(
            [
                browser(),
                "--headless",
                "--no-sandbox",  # as root in a container Chromium refuses to start otherwise
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={scratch}/profile",
                f"--window-size={width},{height}",
                f"--screenshot={raw}",
                report.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
        )
        small(raw, out)


def small(raw: Path, out: Path) -> None:
    """`raw` saved to `out` with an adaptive 256-colour palette: text and plots stay sharp
    at a fraction of the bytes of a full-colour PNG."""
    from PIL import Image

    with Image.open(raw) as image:
        image.convert("RGB").quantize(colors=256).save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", type=Path, help="the store to run in (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        report = run_experiment(args.runs_dir or Path(scratch))
        screenshot(report, args.out, args.width, args.height)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1000:.0f} KB)")
    if size > MAX_BYTES:
        sys.exit(f"{args.out} is over {MAX_BYTES // 1000} KB: lower --height")


if __name__ == "__main__":
    main()
