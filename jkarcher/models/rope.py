"""Rotary position embeddings (RoFormer, Su et al. 2021) with the scalings Qwen2 and Llama use.

Each head vector of size d is split into halves (x1, x2); at position p and frequency index i it is
rotated by the angle p * f_i, f_i = theta^(-2i/d), i < d/2:

    rope(x)_p = x * cos(p f) + rotate_half(x) * sin(p f),   rotate_half(x) = (-x2, x1),

with the frequencies repeated over both halves. Scalings change f only:
- "linear" (position interpolation, Chen et al. 2023): f_i / factor;
- "llama3" (Llama 3.1): wavelengths 2 pi / f_i longer than original_max / low_freq_factor are
  divided by `factor`, those shorter than original_max / high_freq_factor are kept, and in between
  s = (original_max / wavelength - low) / (high - low) blends the two:
  f_i <- (1 - s) f_i / factor + s f_i.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jkarcher.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """The d/2 rotary frequencies f_i of one head, after the config's scaling (float32)."""
    dim = config.head_dim
    freqs = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if config.rope_type == "linear":
        freqs = freqs / config.rope_factor
    elif config.rope_type == "llama3":
        freqs = _llama3_scaled(freqs, config)
    return freqs.astype(np.float32)


def _llama3_scaled(freqs: np.ndarray, config: ModelConfig) -> np.ndarray:
    original, factor = config.rope_original_max_position_embeddings, config.rope_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelengths = 2 * np.pi / freqs
    smooth = (original / wavelengths - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = np.where(wavelengths > original / low, freqs / factor, blended)
    return np.where(wavelengths < original / high, freqs, scaled)


def rotary_angles(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin of p * f for positions [B, T]: two float32 arrays [B, T, head_dim]."""
    angles = positions.astype(jnp.float32)[..., None] * inverse_frequencies(config)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate heads x [B, T, heads, head_dim] by the angles (cos, sin) [B, T, head_dim]."""
    half = x.shape[-1] // 2
    rotated_half = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated_half * sin
