"""Guides over the task LoRA sites: AutoDelta (MAP, the paper) or AutoNormal (mean-field VI)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoGuide, AutoNormal
from pyro.nn import PyroParam

from ..io.task_store import TaskStore
from .pyro_internals import SiteParamDelta, event_dim, guide_plates, loc_and_scale, setup_prototype
from .task_subsample import TASK_PLATE, TaskPlate, enter_plate

INFERENCE = ("map", "vi")
GuideParameter = tuple[str, str, torch.Tensor]  # (site name, "value" | "loc" | "scale", unconstrained tensor)


def guide_parameters(guide: AutoGuide) -> list[GuideParameter]:
    """Every parameter of a set-up guide with the latent site it belongs to and its kind: AutoDelta's
    point ("value", the PyroModule attribute named after its site) or AutoNormal's "loc" / "scale"
    (``guide.locs.<site>`` / ``guide.scales.<site>``). The tensors are the param store's unconstrained
    ones (``pyro.get_param_store().named_parameters()``). Raises if the guide has a parameter of no site."""
    sites = {name for name, _ in guide.prototype_trace.iter_stochastic_nodes()}
    out = []
    for path, value in guide.named_pyro_params():
        tensor = value.unconstrained() if hasattr(value, "unconstrained") else value  # a constrained value links to it
        head, _, rest = path.partition(".")
        if path in sites:
            out.append((path, "value", tensor))
        elif head in ("locs", "scales") and rest in sites:
            out.append((rest, head[:-1], tensor))
        else:
            raise ValueError(f"guide parameter {path!r} belongs to no latent site of the model")
    return out


def task_sites(guide: AutoGuide) -> set[str]:
    """The latent sites sampled under the task plate (one row per task), from the guide's prototype trace."""
    return {
        name
        for name, site in guide.prototype_trace.iter_stochastic_nodes()
        if any(frame.name == TASK_PLATE for frame in site["cond_indep_stack"])
    }


def _latent_sites(guide: AutoGuide, args: tuple, kwargs: dict) -> Iterator[tuple[str, dict, list[pyro.plate]]]:
    """The guide's latent sites (its prototype set up on first use), each with the plates it is sampled
    in (the guide's, from ``create_plates``, for this call's arguments)."""
    setup_prototype(guide, args, kwargs)
    plates = guide_plates(guide, args, kwargs)
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        yield name, site, [plates[frame.name] for frame in site["cond_indep_stack"] if frame.vectorized]


@contextmanager
def _inside(plates: list[pyro.plate]) -> Iterator[None]:
    with ExitStack() as stack:
        for plate in plates:
            stack.enter_context(enter_plate(plate))
        yield


def take_rows(full: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` ([P]) of ``full`` [D, ...], read where ``full`` is and returned on ``index``'s device
    (a disk store's table is in host memory while the model may be on an accelerator). -> [P, ...]."""
    return full.index_select(0, index.to(full.device)).to(index.device)


class _GatherRows(torch.autograd.Function):
    """:func:`take_rows` whose gradient is row-sparse: a COO tensor holding the gathered rows only, on
    ``full``'s device. Pyro's own parameter subsampling (``index_select``) writes a dense [D, ...] gradient
    of zeros every step, 1.8 GB for 1000 SmolLM2 tasks."""

    @staticmethod
    def forward(ctx, full: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        where = index.to(full.device)
        ctx.save_for_backward(where)
        ctx.full_shape = full.shape
        return full.index_select(0, where).to(index.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors  # ascending, unique
        return torch.sparse_coo_tensor(
            index.unsqueeze(0), grad.to(index.device), ctx.full_shape, is_coalesced=True, check_invariants=False
        ), None


def gather_rows(full: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` ([P], ascending, unique) of ``full`` [D, ...] with a row-sparse gradient, on ``index``'s
    device (see :func:`take_rows`). -> [P, ...]."""
    return _GatherRows.apply(full, index)


class TaskDelta(SiteParamDelta):
    """AutoDelta (the MAP guide) whose task-site parameters are gathered for the batch's tasks with a
    row-sparse gradient (:func:`gather_rows`) rather than by Pyro's automatic plate subsampling,
    so that a step's cost does not grow with the number of tasks. Its task tables [D, ...] are
    allocated by ``store`` (in memory, or memory-mapped files: see ``io/task_store.py``)."""

    def __init__(self, model: Callable, *, store: TaskStore | None = None, **options) -> None:
        super().__init__(model, **options)
        self.task_store = store or TaskStore()

    def site_param(self, name: str, site: dict) -> PyroParam:
        """AutoDelta's parameter, but a task site's is a table of the task store, every row at the site's start
        (a site under the task plate starts shared by every task; see ``_init_to_values``)."""
        value = site["value"].detach()
        task = [f for f in site["cond_indep_stack"] if f.name == TASK_PLATE]
        if task:
            rows = task[0].full_size or task[0].size
            value = self.task_store.table(f"guide.{name}", (rows, *value.shape[1:]), fill=value[0], device=value.device)
        elif any(f.full_size not in (None, f.size) for f in site["cond_indep_stack"]):
            raise ValueError(f"site {name!r} is subsampled by a plate other than the task plate")
        return PyroParam(value, site["fn"].support, site["fn"].event_dim)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        result = {}
        for name, site, plates in _latent_sites(self, args, kwargs):
            value = operator.attrgetter(name)(self)  # the whole parameter: read outside the plates
            for plate in plates:
                if isinstance(plate, TaskPlate):
                    value = gather_rows(value, plate.index)
            with _inside(plates):
                result[name] = pyro.sample(name, dist.Delta(value, event_dim=site["fn"].event_dim))
        return result


class MeanFieldNormal(AutoNormal):
    """AutoNormal (same parameters, median, quantiles) whose sites are sampled from their Normal
    directly instead of through an auxiliary site and a Delta.

    Then ``TraceMeanField_ELBO`` can use the closed-form KL to the task prior
    (``stacked_normal.py``) instead of the sampled log-densities, whose gradients cancel terms of
    size |eps| / scale (~1e3 at the start) and leave float32 rounding noise of ~1e-4 in every
    coordinate. Sites with a constrained support (tau) are sampled as the transformed Normal.
    """

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        result = {}
        for name, site, plates in _latent_sites(self, args, kwargs):
            with _inside(plates):
                loc, scale = loc_and_scale(self, name)
                q = dist.Normal(loc, scale).to_event(event_dim(self, name))
                if not _is_real(site["fn"].support):
                    q = dist.TransformedDistribution(q, biject_to(site["fn"].support))
                result[name] = pyro.sample(name, q)
        return result


def _is_real(support: constraints.Constraint) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def make_guide(
    kind: str,
    model: Callable,
    initial_values: Mapping[str, torch.Tensor],
    create_plates: Callable[..., pyro.plate | list[pyro.plate]],
    init_scale: float = 1e-3,
    store: TaskStore | None = None,
) -> AutoGuide:
    """``"map"``: AutoDelta (posterior mode); ``"vi"``: :class:`MeanFieldNormal` (AutoNormal's mean-field Gaussian).

    Every latent site starts at ``initial_values`` (LoRA start, each task at Theta); AutoNormal's
    scales start at ``init_scale``. ``create_plates(*model_args)`` gives the model's task plate for
    those arguments (the tasks present in the batch), by which the guide's parameters are indexed.
    ``store`` allocates the MAP guide's task tables (default: in memory).
    """
    if kind not in INFERENCE:
        raise ValueError(f"inference must be one of {INFERENCE}, got {kind!r}")
    options = {"init_loc_fn": _init_to_values(initial_values), "create_plates": create_plates}
    if kind == "map":
        return TaskDelta(model, store=store, **options)
    if store is not None and store.disk:
        raise ValueError(
            "a disk task store holds the MAP guide's task rows; --inference vi keeps them in memory "
            "(use --task-store memory)"
        )
    return MeanFieldNormal(model, init_scale=init_scale, **options)


def _init_to_values(values: Mapping[str, torch.Tensor]) -> Callable[[dict], torch.Tensor]:
    """Start each site at ``values[name]``. A site of a task subsample (P of the D tasks, see
    ``task_subsample.py``) needs a value shared by every task (an expanded view, as
    ``HierarchicalPrior.initial_values`` gives), whose first P rows the guide repeats to all D tasks."""

    def init(site: dict) -> torch.Tensor:
        value = values[site["name"]]
        shape = site["fn"].shape()
        if value.shape == shape:
            return value.clone()
        if value.shape[1:] != shape[1:] or value.stride(0) != 0:
            raise ValueError(
                f"site {site['name']!r}: cannot start a task subsample of shape {tuple(shape)} "
                f"from per-task values of shape {tuple(value.shape)} (they must be shared by every task)"
            )
        return value[: shape[0]].clone()

    return init
