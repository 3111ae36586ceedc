"""LoRA adapters: extracted from a fine-tuned model and its base by truncated SVD, as
`mergekit-extract-lora` does (`scripts/extract_lora.py`), and read as PEFT writes them.

  extract     the math: a task matrix's rank-r truncated SVD as LoRA factors (`lora_factors`)
  adapter     PEFT adapter directories: tensor names, adapter_config.json, reading and checking
  extraction  an adapter extracted from two checkpoints, tensor by tensor, and written
"""

from jkarcher.lora.adapter import AdapterError, LoraAdapter, read_adapter
from jkarcher.lora.extract import LoraFactors, kept_rank, lora_factors

__all__ = [
    "AdapterError",
    "LoraAdapter",
    "LoraFactors",
    "kept_rank",
    "lora_factors",
    "read_adapter",
]
