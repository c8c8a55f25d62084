"""An agreed sparsity pattern: masking needs every member to send the same coordinates.

Top-k picks different coordinates per member, so masks would not cancel. Instead every
member selects ``random_k_indices(seed, numel, k)`` from a seed all of them know (e.g. from the
round's signed global head): the same indices everywhere, unknown before the round starts.
Masking then runs over the gathered vector; the protocol itself only sees flat uint64 ring vectors.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedjet.secagg.errors import EncodingError
from fedjet.secagg.prg import expand

Indices = npt.NDArray[np.int64]


def _distinct_draws(seed: bytes, numel: int, k: int) -> Indices:
    """The first ``k`` distinct values of a deterministic stream of uniform draws in [0, numel)."""
    drawn = np.empty(0, dtype=np.int64)
    block = 0
    while True:
        want = max(64, int(1.25 * k) + 16)
        words = expand(seed, 2 * want, purpose="indices", round_id=block, context=(numel, k))
        wide = words[0::2].astype(np.uint64) << np.uint64(32) | words[1::2].astype(np.uint64)
        # modulo bias is below numel / 2^64: negligible for any tensor size
        drawn = np.concatenate([drawn, (wide % np.uint64(numel)).astype(np.int64)])
        _, first = np.unique(drawn, return_index=True)
        if len(first) >= k:
            return drawn[np.sort(first)[:k]]
        block += 1


def random_k_indices(seed: bytes, numel: int, k: int) -> Indices:
    """``k`` distinct sorted indices in ``[0, numel)``, the same for everyone with ``seed``."""
    if numel < 1 or not 0 <= k <= numel:
        raise EncodingError(f"cannot pick k={k} of numel={numel} coordinates")
    if 2 * k <= numel:
        return np.sort(_distinct_draws(seed, numel, k))
    # dense selections: draw the (smaller) complement instead
    keep = np.ones(numel, dtype=bool)
    keep[_distinct_draws(seed, numel, numel - k)] = False
    return np.flatnonzero(keep).astype(np.int64)


def gather(values: npt.NDArray[np.generic], indices: Indices) -> npt.NDArray[np.generic]:
    """The agreed coordinates of a flat vector."""
    return values.reshape(-1)[indices]


def scatter(values: npt.NDArray[np.float32], indices: Indices, numel: int) -> npt.NDArray[np.float32]:
    """A dense float vector with ``values`` at ``indices`` and zeros elsewhere."""
    if values.shape != indices.shape:
        raise EncodingError(f"{values.shape[0] if values.ndim else 0} values for {indices.shape[0]} indices")
    out = np.zeros(numel, dtype=np.float32)
    out[indices] = values
    return out
