"""bora_pyro: Bayesian hierarchical multi-task LoRA (BoRA) for Hugging Face causal LMs, in Pyro."""

from .data import Batch, Corpus, CorpusConfig, Split, load_corpus
from .evaluation.laplace import tau_posterior_from_fits
from .evaluation.perplexity import PerplexityReport, evaluate
from .evaluation.tau_posterior import tau_posterior
from .inference import FitResult, TrainConfig, fit
from .io.base_models import load_base_model
from .models import BoRA
from .models.adapter import AdapterConfig
from .models.collapsed_tau import TauPosterior
from .models.gates import GateConfig
from .models.prior import PriorConfig
from .nn.lora import MultiTaskLoRA, MultiTaskLoRALinear
from .runs import RunSpec, load_run
from .version import __version__

__all__ = [
    "__version__",
    "AdapterConfig",
    "BoRA",
    "Batch",
    "Corpus",
    "CorpusConfig",
    "FitResult",
    "GateConfig",
    "MultiTaskLoRA",
    "MultiTaskLoRALinear",
    "PerplexityReport",
    "PriorConfig",
    "RunSpec",
    "Split",
    "TauPosterior",
    "TrainConfig",
    "evaluate",
    "fit",
    "load_base_model",
    "load_corpus",
    "load_run",
    "tau_posterior",
    "tau_posterior_from_fits",
]
