"""bora_pyro: Bayesian hierarchical multi-task LoRA (BoRA) for Hugging Face causal LMs, in Pyro."""

__version__ = "0.1.0"  # before the imports: runs.py records it in every run folder

from .base_models import load_base_model
from .data import Batch, Corpus, CorpusConfig, Split, load_corpus
from .evaluation import PerplexityReport, evaluate
from .inference import FitResult, TrainConfig, fit
from .lora import MultiTaskLoRA, MultiTaskLoRALinear
from .models import BoRA
from .models.gates import GateConfig
from .runs import load_run


__all__ = [
    "BoRA",
    "Batch",
    "Corpus",
    "CorpusConfig",
    "FitResult",
    "GateConfig",
    "MultiTaskLoRA",
    "MultiTaskLoRALinear",
    "PerplexityReport",
    "Split",
    "TrainConfig",
    "evaluate",
    "fit",
    "load_base_model",
    "load_corpus",
    "load_run",
]
