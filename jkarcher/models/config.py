"""The architecture of a Qwen2 or Llama decoder, read from and written to an HF `config.json`.

Only what changes the forward pass is kept. Rotary settings are read from either spelling that
Hugging Face configs use: `rope_theta` plus `rope_scaling` (older files) or `rope_parameters`
(newer files). Anything this implementation would get wrong (another architecture, another
activation, sliding-window attention, a rotary scaling type other than default, linear or llama3)
is refused with a message that names the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from jkarcher.errors import JkarcherError

MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


class ModelConfigError(JkarcherError):
    """An HF config that this implementation cannot run exactly."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a decoder-only Qwen2 / Llama model (hashable: a static jit argument).

    `rope_type` is "default" (theta only), "linear" (positions divided by `rope_factor`) or
    "llama3" (Llama 3.1 frequency-dependent scaling with `rope_low_freq_factor`,
    `rope_high_freq_factor` and `rope_original_max_position_embeddings`).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ModelConfigError(
                f"model_type {self.model_type!r} is not supported (supported: "
                f"{', '.join(MODEL_TYPES)})"
            )
        if self.rope_type not in ROPE_TYPES:
            supported = ", ".join(ROPE_TYPES)
            raise ModelConfigError(f"rope type {self.rope_type!r} is not supported ({supported})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def qwen2(cls, **fields: Any) -> ModelConfig:
        """A Qwen2 config: bias on the q, k, v projections only."""
        return cls(**_derived_fields("qwen2", fields), qkv_bias=True, o_bias=False, mlp_bias=False)

    @classmethod
    def llama(
        cls, *, attention_bias: bool = False, mlp_bias: bool = False, **fields: Any
    ) -> ModelConfig:
        """A Llama config: `attention_bias` on q, k, v and o, `mlp_bias` on the MLP."""
        return cls(
            **_derived_fields("llama", fields),
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=mlp_bias,
        )

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from an HF `config.json` dict; `source` names the file in error messages."""
        try:
            return _from_hf(cls, hf)
        except (ModelConfigError, KeyError, TypeError, ValueError) as err:
            detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            raise ModelConfigError(f"{source}: {detail}") from None

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict that `transformers` loads as this architecture."""
        hf = {
            "architectures": [MODEL_TYPES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rope_theta": self.rope_theta,
            "rope_scaling": self._rope_scaling(),
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = self.mlp_bias
        else:
            hf["use_sliding_window"] = False
        return hf

    def _rope_scaling(self) -> dict[str, Any] | None:
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.rope_factor}
        if self.rope_type == "llama3":
            return {
                "rope_type": "llama3",
                "factor": self.rope_factor,
                "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings,
            }
        return None


def load_config(checkpoint_dir: str | os.PathLike) -> ModelConfig:
    """Read `config.json` from an HF checkpoint directory."""
    path = Path(checkpoint_dir) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelConfigError(f"{path}: cannot read the model config ({err})") from None
    return ModelConfig.from_hf(hf, source=str(path))


def _derived_fields(model_type: str, fields: dict[str, Any]) -> dict[str, Any]:
    fields = {"model_type": model_type, "rms_norm_eps": 1e-6, "tie_word_embeddings": False} | fields
    fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    return fields


def _from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelConfigError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("use_sliding_window"):
        raise ModelConfigError("use_sliding_window=true is not supported (full attention only)")
    fields = {
        "vocab_size": int(hf["vocab_size"]),
        "hidden_size": int(hf["hidden_size"]),
        "intermediate_size": int(hf["intermediate_size"]),
        "num_hidden_layers": int(hf["num_hidden_layers"]),
        "num_attention_heads": int(hf["num_attention_heads"]),
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "max_position_embeddings": int(hf.get("max_position_embeddings", 32768)),
        "initializer_range": float(hf.get("initializer_range", 0.02)),
        **_rope_fields(hf),
    }
    if hf.get("num_key_value_heads") is not None:
        fields["num_key_value_heads"] = int(hf["num_key_value_heads"])
    if hf.get("head_dim") is not None:
        fields["head_dim"] = int(hf["head_dim"])
    if model_type == "qwen2":
        return cls.qwen2(**fields)
    return cls.llama(
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        **fields,
    )


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Rotary settings from `rope_parameters` (newer HF files) or `rope_theta` + `rope_scaling`."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    fields = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        fields["rope_factor"] = float(rope["factor"])
    if rope_type == "llama3":
        missing = [key for key in LLAMA3_ROPE_KEYS if key not in rope]
        if missing:
            raise ModelConfigError(f"llama3 rope scaling lacks {', '.join(missing)}")
        fields["rope_low_freq_factor"] = float(rope["low_freq_factor"])
        fields["rope_high_freq_factor"] = float(rope["high_freq_factor"])
        fields["rope_original_max_position_embeddings"] = int(
            rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
        )
    return fields
