"""Everything that defines a run, as configuration dataclasses: the one home of every option.

``RunSpec`` holds the base model and corpus names and one section per concern: ``corpus``
(:class:`CorpusConfig`), ``adapter`` (:class:`AdapterConfig`), ``prior`` (:class:`PriorConfig`),
``gates`` (:class:`GateConfig`) and ``train`` (:class:`TrainConfig`). Each field is a CLI option
(``options.py`` generates the flags), a key of ``--config`` files and of a run folder's
config.json, and the Python API reads the same objects: adding an option is adding a field. A spec describes a
run and (de)serialises it; ``build.py`` builds the run's model from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..data.corpus import CorpusConfig
from ..inference.config import TrainConfig
from ..io.artifacts import RUN_FORMAT, json_roundtrip, read_json
from ..io.base_models import BASE_DTYPES
from ..models.adapter import AdapterConfig
from ..models.gates import GateConfig
from ..models.prior import PriorConfig
from ..options import option, values_from_file
from ..version import __version__

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # a conversational run's chat template, kept in its folder
TRUST_HELP = (
    "allow the model's own Python code (from its hub repository) to run; off by default, only for models "
    "you trust. Never taken from a file: a run trained with it needs it again"
)


class RemoteCodeRefused(ValueError):
    """A saved run, sweep or config file asks for trust_remote_code, which only the user can grant."""


SECTIONS: dict[str, type] = {
    "corpus": CorpusConfig,
    "adapter": AdapterConfig,
    "prior": PriorConfig,
    "gates": GateConfig,
    "train": TrainConfig,
}
FILE_ONLY_KEYS = ("format", "bora_pyro_version", "torch_version", "python", "tasks", "base_model", "adapted_from")
_LEGACY_ADAPTER_KEYS = {"prior": PriorConfig, "gates": GateConfig}  # run folders before the prior/gates sections


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run: base model, corpus, adapters, prior, gates, training."""

    model: str = option(
        "smollm2-135m",
        "smollm2-135m (embedded, offline), tiny-random-llama (random weights, for "
        "tests), or a Hugging Face id / local folder",
    )
    data: str = option("bible-books", "corpus: bible-books, csv:PATH, jsonl:PATH, datasets:NAME_OR_PATH, ton:PATH")
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    dtype: str = option(
        "float32",
        "weight dtype of the frozen base model (the LoRA factors, Theta and the optimizer state stay float32, "
        "as in PEFT); bfloat16 halves the base's memory",
        choices=tuple(BASE_DTYPES),
    )
    load_in_4bit: bool = option(
        False,
        "load the frozen base in 4 bits (QLoRA: NF4, double quantisation, --dtype compute) with bitsandbytes; the "
        "LoRA factors stay float32",
    )
    load_in_8bit: bool = option(False, "load the frozen base in 8 bits (LLM.int8()) with bitsandbytes")
    posterior_samples: int = option(
        8, "guide draws for posterior-predictive perplexity and the ArviZ file posterior.nc (0 = skip)"
    )
    curvature_docs: int = option(
        8,
        "training documents per task of the curvature pass behind the collapsed posterior of tau "
        "(tau_posterior.csv) and the shrinkage per task (kappa, p_eff in per_task.csv) (0 = skip)",
    )
    trust_remote_code: bool = option(False, TRUST_HELP)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.dtype not in BASE_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(BASE_DTYPES)}, got {self.dtype!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load-in-4bit and --load-in-8bit exclude each other: give one")
        if self.posterior_samples < 0:
            raise ValueError(f"posterior_samples must be >= 0, got {self.posterior_samples}")
        if self.curvature_docs < 0:
            raise ValueError(f"curvature_docs must be >= 0, got {self.curvature_docs}")
        if self.corpus.seed is None:  # the split follows the training seed unless given
            object.__setattr__(self, "corpus", replace(self.corpus, seed=self.train.seed))

    @property
    def quantized_bits(self) -> int | None:
        """4 or 8 where the frozen base is loaded quantised (--load-in-4bit / --load-in-8bit), else None."""
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else None

    def to_dict(self) -> dict:
        top = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in SECTIONS}
        return {**top, **{name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], trust_remote_code: bool = False, source: str = "this run") -> RunSpec:
        """The spec saved in a file (a run folder's config.json, a checkpoint's spec.json, a --config file;
        folders of earlier versions included). A file never grants ``trust_remote_code``: a spec that asks
        for it is refused unless the caller (the user, e.g. with ``--trust-remote-code``) grants it too."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: a run's settings are a JSON object, got {type(d).__name__}")
        if d.get("trust_remote_code") and not trust_remote_code:
            raise RemoteCodeRefused(
                f"{source} was made with --trust-remote-code (model {d.get('model')!r} runs Python code from its "
                "repository); bora_pyro never takes that permission from a file: pass --trust-remote-code "
                "yourself if you trust that model's code"
            )
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)} - set(FILE_ONLY_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {sorted(unknown)}; the sections are {sorted(SECTIONS)}")
        sections = {name: d.pop(name, None) for name in SECTIONS}
        sections = {name: {} if values is None else values for name, values in sections.items()}
        for name, values in sections.items():
            if not isinstance(values, dict):
                raise ValueError(f"{source}: {name} must be a JSON object of settings, got {values!r}")
            sections[name] = dict(values)
        if "bora_pyro_version" in d and "long_documents" not in sections["corpus"]:
            sections["corpus"]["long_documents"] = "truncate"  # written before long documents were split
        if "init_seed" in sections["adapter"] or "tau" in sections["adapter"]:  # a run folder of an earlier version
            sections["adapter"].setdefault("task_subsampling", False)  # before the option: every task's prior
            sections["adapter"].pop("init_seed", None)  # it always equalled the training seed
            for name, cls_ in _LEGACY_ADAPTER_KEYS.items():
                names = {f.name for f in dataclasses.fields(cls_)}
                sections[name].update({k: sections["adapter"].pop(k) for k in list(sections["adapter"]) if k in names})
        try:
            built = {
                name: section_cls(**values_from_file(section_cls, sections[name], f"{source}: {name}"))
                for name, section_cls in SECTIONS.items()
            }
            top = values_from_file(cls, {k: v for k, v in d.items() if k not in FILE_ONLY_KEYS}, f"{source}:")
            top["trust_remote_code"] = bool(top.get("trust_remote_code", False)) and trust_remote_code
            return cls(**top, **built)
        except ValueError as err:
            raise ValueError(str(err) if str(err).startswith(source) else f"{source}: {err}") from None

    @classmethod
    def from_run_folder(cls, path: str | Path, trust_remote_code: bool = False) -> RunSpec:
        """A run folder's settings, refusing folders of an incompatible run format."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"run folder {str(path)!r} does not exist")
        config = read_json(path / "config.json")
        if not isinstance(config, dict):
            raise ValueError(f"{path / 'config.json'} is not a JSON object of settings")
        if config.get("format") != RUN_FORMAT:
            raise ValueError(
                f"{path} was written by bora_pyro {config.get('bora_pyro_version', '?')} in run format "
                f"{config.get('format')!r}; this version ({__version__}) reads format {RUN_FORMAT}"
            )
        spec = cls.from_dict(config, trust_remote_code, str(path))
        if (path / CHAT_TEMPLATE_FILE).is_file():  # the template trained with, not the file it was read from
            spec = replace(spec, corpus=replace(spec.corpus, chat_template=str(path / CHAT_TEMPLATE_FILE)))
        return spec

    def settings(self) -> dict:
        """The spec as plain JSON values (what run fingerprints and sweep comparisons use)."""
        return json_roundtrip(self.to_dict())
