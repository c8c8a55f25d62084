"""Two ``fedjet up`` jobs with the same seed, data and flags, side by side, and how far apart
their exported models ended: the test of whether anything but the noise decided a run."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import FedjetProcess

# Plain runs may differ in float summation order only (updates of a round arrive in any order);
# noise differs at the size of the noise, orders of magnitude above that.
FLOAT_ORDER = 1e-5


def run_side_by_side(
    runs: Sequence[Sequence[str]], timeout: float = 300, envs: Sequence[dict[str, str]] | None = None
) -> list[str]:
    """Run each argument list as ``fedjet ...`` at the same time (``envs``: extra environment per
    run); their outputs, all succeeded."""
    extra = envs or [{} for _ in runs]
    procs = [FedjetProcess(*argv, env=env, log=Path(tempfile.mkdtemp(prefix="fedjet-twin-")) / "output")
             for argv, env in zip(runs, extra, strict=True)]  # fmt: skip
    outputs = []
    for proc, argv in zip(procs, runs, strict=True):
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            pytest.fail(f"fedjet {' '.join(argv)} did not finish within {timeout:.0f} s:\n{output[-3000:]}")
        assert proc.returncode == 0, output[-3000:]
        outputs.append(output)
    return outputs


def largest_difference(a: Path, b: Path) -> float:
    """The largest coordinate difference of two exported models."""
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    return max(float((left[n].float() - right[n].float()).abs().max()) for n in left)
