"""A Flax forward of Qwen2 / Llama decoders, loaded from and saved to HF checkpoints.

    config, params = jkarcher.models.load("path/to/checkpoint")
    logits, hidden_states = jkarcher.models.forward(config, params, tokens, mask)

`params` is a plain nested dict laid out like the HF tensor names (see `transformer`), ready for
`jkarcher.merge`, `jax.grad` and optax; `save` writes it back as an HF checkpoint.
"""

from jkarcher.models.checkpoint import (
    expected_tensors,
    hf_name,
    load,
    load_params,
    param_path,
    params_to_hf,
    save,
    save_statistics,
)
from jkarcher.models.config import ModelConfig, ModelConfigError, load_config
from jkarcher.models.text import (
    TokenizerError,
    batches,
    file_batches,
    leading_special_tokens,
    load_tokenizer,
    stream,
    text_batches,
    text_windows,
)
from jkarcher.models.transformer import (
    CausalLM,
    forward,
    init_params,
    next_token_stats,
    param_shapes,
    selected_hidden_states,
)

__all__ = [
    "CausalLM",
    "ModelConfig",
    "ModelConfigError",
    "TokenizerError",
    "batches",
    "expected_tensors",
    "file_batches",
    "forward",
    "hf_name",
    "init_params",
    "leading_special_tokens",
    "load",
    "load_config",
    "load_params",
    "load_tokenizer",
    "next_token_stats",
    "param_path",
    "param_shapes",
    "params_to_hf",
    "save",
    "save_statistics",
    "selected_hidden_states",
    "stream",
    "text_batches",
    "text_windows",
]
