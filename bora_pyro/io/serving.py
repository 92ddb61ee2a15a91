"""What a multi-adapter server makes of an exported adapter: vLLM's limits, checked at export.

vLLM (and LoRAX, which follows it) load PEFT adapter folders, but only up to a rank fixed when the server
starts: ``--max-lora-rank``, one of :data:`VLLM_MAX_LORA_RANKS` (default 16); every adapter slot is sized
for that rank, so a large one costs memory and speed for all adapters. Only ``lora_A`` / ``lora_B`` tensors
of the model's own linear layers are served (our exports hold nothing else), and GPT-2's ``Conv1D`` layers
(``fan_in_fan_out``) are not among those vLLM adapts.
"""

from __future__ import annotations

from ..nn.lora import MultiTaskLoRA

VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for --max-lora-rank
VLLM_DEFAULT_MAX_LORA_RANK = 16


def vllm_warnings(lora: MultiTaskLoRA) -> list[str]:
    """One line for each reason vLLM would refuse or slow the adapters of ``lora`` (all share its rank and
    layers); empty when they serve at vLLM's defaults."""
    lines = []
    rank = lora.rank
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        lines.append(f"rank {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}): vLLM refuses it")
    elif rank > VLLM_DEFAULT_MAX_LORA_RANK:
        needed = next(r for r in VLLM_MAX_LORA_RANKS if r >= rank)
        lines.append(
            f"rank {rank} exceeds vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}: serve with "
            f"--max-lora-rank {needed} (every adapter slot is sized for it)"
        )
    if any(layer.fan_in_fan_out for layer in lora.layers.values()):
        lines.append("GPT-2-style Conv1D layers (fan_in_fan_out): vLLM does not adapt them; serve with PEFT")
    return lines
