"""The codebase's shape: layers that import only downwards, modules that import on their own, an import
of ``bora_pyro`` that leaves ArviZ and matplotlib alone, Pyro's private API touched in one module only
(and still what we expect), and every option in one home (CLI, --config, config.json)."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from safetensors.torch import load_file

import bora_pyro
from bora_pyro.cli import build_parser, main
from bora_pyro.models import pyro_internals
from bora_pyro.models.guides import make_guide
from bora_pyro.runs import SECTIONS, RunSpec

from .conftest import synthetic_rows, train_args

PACKAGE = Path(bora_pyro.__file__).parent
# A module may import from its own package and from the packages before it, never from those after it.
LAYERS = [
    "version",
    "options",
    "distributed",
    "nn",
    "data",
    "io",
    "models",
    "evaluation",
    "inference",
    "runs",
    "sweep",
    "seed_sweep",
    "cli",
]


def modules() -> list[str]:
    return sorted(
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in PACKAGE.rglob("*.py")
    )


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def imported(path: Path, module: str) -> set[str]:
    """The bora_pyro modules that ``module`` (at ``path``) imports, relative imports resolved."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            if name.startswith("bora_pyro"):
                out.add(name)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("bora_pyro")}
    return out


def test_layers_import_only_downwards():
    wrong = []
    for module in modules():
        if module == "bora_pyro":
            continue
        path = PACKAGE.parent / (
            module.replace(".", "/")
            + ("/__init__.py" if (PACKAGE.parent / module.replace(".", "/")).is_dir() else ".py")
        )
        for target in imported(path, module):
            if target == "bora_pyro" or layer(target) > layer(module):  # the package itself sits on top
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_every_module_imports_on_its_own_and_bora_pyro_leaves_arviz_and_matplotlib_alone():
    script = f"""
import importlib, sys
import torch, pyro, transformers  # heavy third-party imports stay loaded between modules
failed = []
for name in {modules()!r}:
    for loaded in [m for m in sys.modules if m == "bora_pyro" or m.startswith("bora_pyro.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as err:
        failed.append(f"{{name}}: {{type(err).__name__}}: {{err}}")
for loaded in [m for m in sys.modules if m.startswith(("bora_pyro", "arviz", "xarray", "matplotlib"))]:
    del sys.modules[loaded]
import bora_pyro
print(repr((failed, sorted(m for m in ("arviz", "xarray", "matplotlib") if m in sys.modules))))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    failed, heavy = eval(out.stdout.strip().splitlines()[-1])  # our own repr
    assert failed == [] and heavy == []


THIRD_PARTY = ("pyro", "torch", "transformers", "peft")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _imported_roots(tree: ast.Module) -> dict[str, str]:
    """Local name -> the top-level package it was imported from (``import pyro.distributions as dist``: dist ->
    pyro; ``from torch import nn``: nn -> torch); relative imports (our own modules) are left out."""
    roots = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                roots[alias.asname or alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                roots[alias.asname or alias.name] = node.module.split(".")[0]
    return roots


def _root_name(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _our_private_names(trees) -> set[str]:
    """Every ``_name`` bora_pyro defines itself: functions, methods, classes, attributes it assigns."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return {n for n in names if _private(n)}


def _overrides(module: str | None, cls: str, method: str) -> bool:
    """Whether ``method`` of the class ``cls`` of our ``module`` overrides a dependency's (a private hook); a
    class that cannot be imported (a snippet) counts every private method as one."""
    try:
        owner = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, TypeError, ValueError):
        return True
    return any(method in vars(base) for base in owner.__mro__[1:] if base.__module__.split(".")[0] in THIRD_PARTY)


def private_uses(sources: dict[str, str]) -> list[str]:
    """Uses of a private (``_``-prefixed) name of pyro, torch, transformers or peft in ``sources`` (file name ->
    code): an attribute of one of their names (``torch._foo``, ``AutoGuide._setup``), a private name imported
    from them, a private method of a subclass of one of their classes that overrides one of theirs (a private
    hook), and a private attribute of any other object that bora_pyro does not define itself (``p.grad._values``)."""
    trees = {name: ast.parse(code) for name, code in sources.items()}
    ours = _our_private_names(trees.values())
    found = []
    for file, tree in trees.items():
        roots = _imported_roots(tree)
        for node in ast.walk(tree):
            where = f"{file}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                if node.module.split(".")[0] in THIRD_PARTY:
                    found += [f"{where} imports {a.name}" for a in node.names if _private(a.name)]
            elif isinstance(node, ast.ClassDef):
                bases = {roots.get(_root_name(b) or "") for b in node.bases}
                module = "bora_pyro." + file.removesuffix(".py").replace("/", ".") if file.endswith(".py") else None
                if bases & set(THIRD_PARTY):
                    found += [
                        f"{where} {node.name} overrides {f.name}"
                        for f in node.body
                        if isinstance(f, ast.FunctionDef) and _private(f.name) and _overrides(module, node.name, f.name)
                    ]
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                root = _root_name(node.value)
                if root in ("self", "cls"):
                    continue
                package = roots.get(root or "")
                if package in THIRD_PARTY or (package is None and node.attr not in ours):
                    found.append(f"{where} uses {ast.unparse(node)}")
    return found


def test_private_apis_of_dependencies_are_used_in_one_module_only():
    sources = {str(p.relative_to(PACKAGE)): p.read_text() for p in PACKAGE.rglob("*.py")}
    internals = "models/pyro_internals.py"
    assert private_uses({k: v for k, v in sources.items() if k != internals}) == []
    assert private_uses({internals: sources[internals]})  # the one module that does: the check sees it


@pytest.mark.parametrize(
    "code",
    [
        "import torch\nx = torch._C",
        "from torch.nn import Module\nclass A(Module):\n    def _apply(self, fn):\n        pass",
        "from transformers import _private_thing",
        "import pyro\npyro.get_param_store()._params",
        "def f(p):\n    return p.grad._values()",
        "from pyro.infer.autoguide import AutoGuide as G\nG._setup_prototype(None)",
    ],
)
def test_the_private_api_check_catches_each_form(code):
    assert private_uses({"case": code})


def test_the_private_pyro_hooks_still_do_what_we_rely_on(make_corpus, tiny_lm):
    corpus = make_corpus()
    bora = bora_pyro.BoRA(tiny_lm[0], corpus.tasks, rank=2, tau=10.0, inference="vi")
    batch = corpus.train.collate([0, 1])
    guide = make_guide("vi", bora.model, bora.prior.initial_values(bora.init), bora._task_plates)
    with bora.param_scope():
        pyro_internals.setup_prototype(guide, (batch,), {})
        assert guide.prototype_trace is not None
        plates = pyro_internals.guide_plates(guide, (batch,), {})
        assert plates["tasks"].subsample_size == len(set(batch.task_index.tolist()))
        name, site = next(iter(guide.prototype_trace.iter_stochastic_nodes()))
        loc, scale = pyro_internals.loc_and_scale(guide, name)  # outside a forward pass: every task's row
        assert loc.shape == scale.shape == (len(corpus.tasks), *site["fn"].event_shape) and (scale > 0).all()
        assert pyro_internals.event_dim(guide, name) == 2
        # after a forward pass, a constrained guide parameter links to the param store's unconstrained tensor
        guide(batch)
        store = dict(pyro.get_param_store().named_parameters())
        assert all(
            any(v.unconstrained() is t for t in store.values())
            for n, v in guide.named_pyro_params()
            if n.startswith("scales.")
        )


def test_every_config_field_is_an_option_with_help_and_a_config_key():
    parser = build_parser()
    train = parser.parse_args(["train", "--out", "x"]).commands["train"]
    flags = {opt for action in train._actions for opt in action.option_strings}
    for name, cls in {"": RunSpec, **SECTIONS}.items():
        for field in cls.__dataclass_fields__.values():
            if field.name in SECTIONS:
                continue
            assert field.metadata.get("help"), f"{name}.{field.name} has no help"
            flag = field.metadata.get("flag", f"--{field.name.replace('_', '-')}")
            assert flag in flags, f"{name}.{field.name}: no {flag}"


def test_a_run_folders_config_json_reproduces_the_run(tmp_path, capsys):
    data = tmp_path / "corpus.csv"
    synthetic_rows({"north": 14, "south": 8, "east": 4}).to_csv(data, index=False)
    first, again, changed = tmp_path / "first", tmp_path / "again", tmp_path / "changed"
    options = ["--tau", "30", "--rank", "4", "--lr", "0.01", "--posterior-samples", "8"]  # 8: the CLI default
    assert main(train_args(data, first, *options)) == 0
    assert main(["train", "--config", str(first / "config.json"), "--out", str(again)]) == 0
    for name, value in load_file(first / "adapters.safetensors").items():
        assert torch.equal(load_file(again / "adapters.safetensors")[name], value), name
    assert (first / "train_log.csv").read_text() == (again / "train_log.csv").read_text()
    # options on the command line win over the file
    assert main(["train", "--config", str(first / "config.json"), "--steps", "2", "--out", str(changed)]) == 0
    config = json.loads((changed / "config.json").read_text())
    assert config["train"]["steps"] == 2 and config["prior"]["tau"] == 30 and config["adapter"]["rank"] == 4
    capsys.readouterr()
    (tmp_path / "bad.json").write_text(json.dumps({"model": "tiny-random-llama", "optimiser": "sgd"}))
    assert main(["train", "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "r")]) == 2
    assert "unknown setting(s) ['optimiser']" in capsys.readouterr().err


@pytest.mark.parametrize("legacy", [True, False])
def test_run_folders_of_the_previous_layout_still_load(legacy):
    old = {
        "format": 1,
        "bora_pyro_version": "0.1.0",
        "model": "tiny-random-llama",
        "data": "csv:x.csv",
        "corpus": {"max_tokens": 48, "seed": 0},
        "train": {"steps": 5, "seed": 0},
        "adapter": {
            "rank": 4,
            "alpha": 8.0,
            "tau": "inf",
            "init_seed": 0,
            "parameterization": "centered",
            "rank_gates": "shared",
            "gate_init": 4.5,
        },
    }
    spec = RunSpec.from_dict(old if legacy else RunSpec.from_dict(old).to_dict())
    assert spec.prior.tau == float("inf") and spec.prior.parameterization == "centered"
    assert spec.gates.rank_gates == "shared" and spec.gates.gate_init == 4.5 and spec.adapter.rank == 4
    assert spec.adapter.task_subsampling is False  # runs before the option used every task's prior term
    assert spec.corpus.long_documents == ("truncate" if legacy else "truncate")  # before chunking: documents were cut
