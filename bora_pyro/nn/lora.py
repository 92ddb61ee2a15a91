"""Multi-task LoRA: one frozen base layer, stacked per-task low-rank factors.

Every adapted layer computes, for an example of task ``d``::

    y = W0 x + (alpha / r) * B_d A_d x

The per-task factors are *not* parameters of the layer: the Pyro model samples them
(``[D, r, in]`` and ``[D, out, r]``) and hands them to the wrapped model for one forward pass with
:meth:`MultiTaskLoRA.activate`. A batch may mix tasks; each example gathers its own task's
factors, so the whole batch runs in one forward pass with two batched matmuls per layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .gates import LayerGates
from .targets import Targets, is_conv1d, resolve_targets, select_layers

# Prefixes dropped from module names to make short, stable Pyro site names.
_NAME_PREFIXES = ("model.decoder.", "model.", "transformer.", "gpt_neox.")

Factors = Mapping[str, torch.Tensor]  # site-style names "<layer>.A" / "<layer>.B" -> stacked tensors
TaskRows = Callable[[Sequence[int]], Factors]  # task ids -> their factors, stacked [P, ...] in that order


def rows_of(factors: Factors | TaskRows) -> TaskRows:
    """A row source: ``factors`` itself if it is a function of task ids, else rows of the stacked tensors."""
    if callable(factors):
        return factors
    return lambda ids: {k: v[torch.as_tensor(list(ids), dtype=torch.long, device=v.device)] for k, v in factors.items()}


class MultiTaskLoRALinear(nn.Module):
    """A frozen linear (or GPT-2 ``Conv1D``) layer plus per-example gathered LoRA factors.

    Shapes:
        x: [batch, tokens, in] -> y: [batch, tokens, out];
        factors A: [D, r, in], B: [D, out, r]; task_index: [batch] (values in 0..D-1).
        With D == 1 every example uses the single adapter (pooled mode, no gather).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base
        self.fan_in_fan_out = is_conv1d(base)
        if self.fan_in_fan_out:  # Conv1D's weight is [in, out]
            in_features, out_features = base.weight.shape
        else:  # nn.Linear and its quantised subclasses (whose packed weight has another shape)
            in_features, out_features = base.in_features, base.out_features
        self.in_features, self.out_features = in_features, out_features
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = dropout  # PEFT's lora_dropout: on the LoRA branch's input, while ``dropping``
        self.dropping = False
        self._A: torch.Tensor | None = None  # [D, r, in] while a context is active
        self._B: torch.Tensor | None = None  # [D, out, r]
        self._task_index: torch.Tensor | None = None  # [batch]
        self._gates: LayerGates | None = None  # B-LoRA rank / precision gates while a context is active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self._A is None:
            return y
        A, B, gates = self._A, self._B, self._gates
        x = x.to(A.dtype)
        if self.dropping and self.dropout > 0:
            x = nn.functional.dropout(x, self.dropout, training=True)
        if gates is not None:  # B-LoRA: factors and input at their gated precision
            A, B, x = gates.quantize_factor(A), gates.quantize_factor(B), gates.quantize_input(x)
        rank_gates = None if gates is None else gates.rank  # [G, r]
        idx = self._task_index
        if A.shape[0] > 1 or (rank_gates is not None and rank_gates.shape[0] > 1):
            if idx is None or idx.shape[0] != x.shape[0]:
                raise ValueError(
                    f"task_index must give one task per example: got {None if idx is None else tuple(idx.shape)}"
                    f" for a batch of {x.shape[0]}"
                )
        if A.shape[0] == 1:  # one adapter for every example
            h = x @ A[0].transpose(0, 1)  # [batch, tokens, r]
        else:
            h = torch.bmm(x, A[idx].transpose(1, 2))  # [batch, tokens, r]
        if rank_gates is not None:  # switch rank components: B diag(g) A
            h = h * (rank_gates[0] if rank_gates.shape[0] == 1 else rank_gates[idx][:, None, :])
        if B.shape[0] == 1:
            delta = h @ B[0].transpose(0, 1)
        else:
            delta = torch.bmm(h, B[idx].transpose(1, 2))  # [batch, tokens, out]
        return y + self.scaling * delta.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, scaling={self.scaling:g}"


@dataclass(frozen=True)
class AdaptedLayer:
    """One adapted layer: its short name (used in site names), full module path and shapes."""

    name: str  # e.g. "layers.3.self_attn.q_proj"
    path: str  # e.g. "model.layers.3.self_attn.q_proj"
    in_features: int
    out_features: int

    def shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        """Per-task factor shapes (without the task dimension): A [r, in], B [out, r]."""
        return {f"{self.name}.A": (rank, self.in_features), f"{self.name}.B": (self.out_features, rank)}


def _short_name(path: str) -> str:
    for prefix in _NAME_PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


class MultiTaskLoRA:
    """Wraps the target layers of a Hugging Face causal LM (in place) with multi-task LoRA layers.

    The base LM's own parameters are frozen. The wrapper holds no trainable state: factors are
    passed per forward pass through :meth:`activate`. ``targets``: which linear layers to adapt, as PEFT's
    ``target_modules`` (names matched as path suffixes, ``"all-linear"``, or a regular expression on the
    full path: ``nn/targets.py``); default by model type.
    """

    def __init__(
        self,
        lm: nn.Module,
        rank: int = 8,
        alpha: float = 16.0,
        targets: Targets | None = None,
        dropout: float = 0.0,
    ) -> None:
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {dropout!r}")
        self.lm = lm
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.targets = resolve_targets(lm, targets)
        for p in lm.parameters():
            p.requires_grad_(False)
        self.layers: dict[str, MultiTaskLoRALinear] = {}
        self.adapted: list[AdaptedLayer] = []
        self.gradient_checkpointing = False
        self.bf16 = False
        self._wrap()

    def configure(self, gradient_checkpointing: bool = False, bf16: bool = False) -> None:
        """Compute options. ``gradient_checkpointing``: keep only each decoder layer's input and
        recompute the layer in the backward pass (less activation memory, one more forward; for
        long sequences). ``bf16``: run the LM under bfloat16 autocast (meant for GPUs; the LoRA
        factors, optimizer and log-probabilities stay float32)."""
        if gradient_checkpointing and not getattr(self.lm, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(self.lm).__name__} does not support gradient checkpointing")
        if gradient_checkpointing:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif self.gradient_checkpointing:
            self.lm.gradient_checkpointing_disable()
        for module in self.lm.modules():  # HF checkpoints a layer only in training mode: flag the layers alone,
            if isinstance(module, GradientCheckpointingLayer):  # so that dropout etc. inside them stay in eval mode
                module.training = gradient_checkpointing
        self.gradient_checkpointing, self.bf16 = gradient_checkpointing, bf16

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast when configured (see :meth:`configure`), else nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _wrap(self) -> None:
        if any(isinstance(m, MultiTaskLoRALinear) for m in self.lm.modules()):
            raise ValueError("model is already wrapped with multi-task LoRA")
        wrapped = [
            (path, MultiTaskLoRALinear(module, self.rank, self.alpha, self.dropout))
            for path, module in select_layers(self.lm, self.targets)
        ]
        narrowest = min(wrapped, key=lambda item: min(item[1].in_features, item[1].out_features))
        width = min(narrowest[1].in_features, narrowest[1].out_features)
        if self.rank > width:  # B A has rank <= min(in, out): a larger r only costs memory
            raise ValueError(
                f"rank {self.rank} exceeds the width {width} of the adapted layer {narrowest[0]!r} "
                f"(in {narrowest[1].in_features}, out {narrowest[1].out_features}); use a rank <= {width}"
            )
        for path, layer in wrapped:  # the model is changed only once every target is known to fit
            parent_path, _, child = path.rpartition(".")
            setattr(self.lm.get_submodule(parent_path) if parent_path else self.lm, child, layer)
            name = _short_name(path)
            self.layers[name] = layer
            self.adapted.append(AdaptedLayer(name, path, layer.in_features, layer.out_features))

    def paths(self) -> list[str]:
        """The full module paths of the adapted layers, in the model's order."""
        return [layer.path for layer in self.adapted]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-task factor shapes by name ("<layer>.A": (r, in), "<layer>.B": (out, r))."""
        out: dict[str, tuple[int, ...]] = {}
        for layer in self.adapted:
            out.update(layer.shapes(self.rank))
        return out

    def num_parameters(self) -> int:
        """Number of LoRA parameters of ONE adapter (one task)."""
        return sum(math.prod(s) for s in self.shapes().values())

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @contextlib.contextmanager
    def activate(
        self,
        factors: Factors | None,
        task_index: torch.Tensor | None = None,
        gates: Mapping[str, LayerGates] | None = None,
    ) -> Iterator[None]:
        """Run the LM with the given stacked factors; ``None`` runs the bare base model. ``gates``
        (by layer name, see ``models.gates``) switch rank components and set the precision.

        Shapes:
            factors["<layer>.A"]: [D, r, in], factors["<layer>.B"]: [D, out, r];
            task_index: [batch] (may be None when D == 1 and the gates are shared).
        """
        if factors is not None:
            expected = set(self.shapes())
            if set(factors) != expected:
                missing, extra = sorted(expected - set(factors)), sorted(set(factors) - expected)
                raise ValueError(
                    f"factors do not match the adapted layers: missing {missing[:3]}, unexpected {extra[:3]} "
                    "(give one A and one B per adapted layer, named as MultiTaskLoRA.shapes() names them)"
                )
        try:
            for name, layer in self.layers.items():
                if factors is None:
                    layer._A = layer._B = None
                else:
                    layer._A, layer._B = factors[f"{name}.A"], factors[f"{name}.B"]
                layer._task_index = task_index
                layer._gates = None if gates is None or factors is None else gates[name]
            yield
        finally:
            if not self.gradient_checkpointing:  # the backward pass re-runs the layers and needs the factors
                for layer in self.layers.values():
                    layer._A = layer._B = layer._task_index = layer._gates = None

    @contextlib.contextmanager
    def dropping(self) -> Iterator[None]:
        """Apply the LoRA dropout (PEFT's ``lora_dropout``: on each adapted layer's input to A) inside: a
        training step's forward AND backward (a recomputed layer must drop the same units); never when scoring."""
        try:
            for layer in self.layers.values():
                layer.dropping = True
            yield
        finally:
            for layer in self.layers.values():
                layer.dropping = False

    def init_factors(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Standard LoRA start for one adapter: A Kaiming-uniform (as PEFT/nn.Linear), B zero.

        Shapes: "<layer>.A": [r, in], "<layer>.B": [out, r] (no task dimension).
        """
        out: dict[str, torch.Tensor] = {}
        for name, shape in self.shapes().items():
            if name.endswith(".A"):
                bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
                out[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
            else:
                out[name] = torch.zeros(shape)
        return {k: v.to(self.device) for k, v in out.items()}
