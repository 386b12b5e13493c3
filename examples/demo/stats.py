"""demo/stats: an endpoint that uses a managed folder and numpy.

Module-level code runs once in each worker when the pool starts, as on a
Dataiku API node: here it reads the reference prices from the endpoint's
first folder (``folders[0]``), so a call only does the arithmetic.
"""

import json
import os

import numpy as np

with open(os.path.join(folders[0], "reference.json"), encoding="utf-8") as fh:  # noqa: F821 - `folders` is set by cruised
    REFERENCE = json.load(fh)

PRICES = {sym: np.asarray(p, dtype=float) for sym, p in REFERENCE["prices"].items()}


def stats(sym, window=3):
    """Summary statistics and a moving average of ``sym``'s reference prices."""
    if sym not in PRICES:
        raise DkuCustomApiException(f"unknown symbol {sym!r}; known: {', '.join(sorted(PRICES))}", http_status_code=404)  # noqa: F821
    p = PRICES[sym]
    window = int(window)
    if not 1 <= window <= len(p):
        raise DkuCustomApiException(f"window must be between 1 and {len(p)}", http_status_code=400)  # noqa: F821
    moving = np.convolve(p, np.ones(window) / window, mode="valid")
    return {"sym": sym, "n": p.size, "mean": p.mean(), "std": p.std(), "min": p.min(), "max": p.max(), "moving_average": moving}
