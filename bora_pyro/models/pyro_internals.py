"""The private Pyro hooks bora_pyro needs, in one place; ``tests/test_pyro_internals.py`` fails loudly
when a Pyro release changes them (pyproject.toml bounds pyro-ppl to the tested minor version).

Our guides override ``AutoGuide.forward`` (``guides.py``: the MAP guide gathers the batch's task rows
with a row-sparse gradient; the mean-field guide samples each site from its Normal directly, for the
closed-form KL). A forward has to do what AutoGuide's own forwards do with private methods: set the
guide's prototype up on first use, get the guide's plates for the call's arguments, and (AutoNormal)
read a site's location and scale and its event dimension. The MAP guide also creates its task tables
itself (through the task store, without a [D, ...] temporary), after AutoGuide's prototype trace.
"""

from __future__ import annotations

import pyro
import torch
from pyro.infer.autoguide import AutoGuide, AutoNormal


def trace_prototype(guide: AutoGuide, args: tuple, kwargs: dict) -> None:
    """AutoGuide's own part of a guide's setup: trace the model once into ``guide.prototype_trace``
    (each site at its init value), creating no guide parameters (for a guide that creates its own)."""
    AutoGuide._setup_prototype(guide, *args, **kwargs)


def setup_prototype(guide: AutoGuide, args: tuple, kwargs: dict) -> None:
    """Trace the model once to build ``guide.prototype_trace`` and the guide's parameters (first call only)."""
    if guide.prototype_trace is None:
        guide._setup_prototype(*args, **kwargs)


def guide_plates(guide: AutoGuide, args: tuple, kwargs: dict) -> dict[str, pyro.plate]:
    """The guide's plates by name for these model arguments (its ``create_plates`` ones included)."""
    return guide._create_plates(*args, **kwargs)


def loc_and_scale(guide: AutoNormal, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoNormal's location and scale of site ``name``, indexed by the site's subsampled plates."""
    return guide._get_loc_and_scale(name)


def event_dim(guide: AutoNormal, name: str) -> int:
    """The number of event dimensions of site ``name`` in an AutoNormal guide."""
    return guide._event_dims[name]
