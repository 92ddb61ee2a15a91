"""The private Pyro hooks bora_pyro needs, in one place; ``tests/test_structure.py`` fails loudly when a Pyro
release changes them (pyproject.toml bounds pyro-ppl to the tested minor version), and on a private name of
pyro, torch, transformers or peft used anywhere else.

Our guides override ``AutoGuide.forward`` (``guides.py``: the MAP guide gathers the batch's task rows
with a row-sparse gradient; the mean-field guide samples each site from its Normal directly, for the
closed-form KL). A forward has to do what AutoGuide's own forwards do with private methods: set the
guide's prototype up on first use, get the guide's plates for the call's arguments, and (AutoNormal)
read a site's location and scale and its event dimension. The MAP guide also creates its task tables
itself (through the task store, without a [D, ...] temporary), after AutoGuide's prototype trace: it overrides
AutoDelta's private setup through :class:`SiteParamDelta`, which asks it for each site's parameter.
"""

from __future__ import annotations

import pyro
import torch
from pyro.infer.autoguide import AutoDelta, AutoGuide, AutoNormal
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroParam
from pyro.poutine.messenger import Messenger


class SiteRecorder(Messenger):
    """Keeps the distribution (``fn``) of the sample site ``name`` as the model samples it, through a messenger's
    sample hook; ``fn`` is None until then."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.fn = None

    def _pyro_sample(self, msg: dict) -> None:
        if msg["name"] == self.name:
            self.fn = msg["fn"]


class SiteParamDelta(AutoDelta):
    """An AutoDelta that makes each latent site's parameter itself: AutoGuide's own setup traces the model once
    into ``prototype_trace`` (each site at its init value), then :meth:`site_param` gives every site's
    parameter (AutoDelta would make each one from the site's value)."""

    def _setup_prototype(self, *args, **kwargs) -> None:
        AutoGuide._setup_prototype(self, *args, **kwargs)
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            deep_setattr(self, name, self.site_param(name, site))

    def site_param(self, name: str, site: dict) -> PyroParam:
        """The parameter of the latent site ``name`` (``site``: its node of the prototype trace): here AutoDelta's
        own, the site's init value on its support; a subclass overrides it."""
        return PyroParam(site["value"].detach(), site["fn"].support, site["fn"].event_dim)


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
