"""The Qwen2 / Llama decoder in Flax linen, with a parameter pytree laid out like the HF checkpoint.

Architecture (Llama: Touvron et al. 2023; Qwen2: Yang et al. 2024), per layer, pre-norm residual:

    h = h + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),  n = rmsnorm(h)
    h = h + down_proj(silu(gate_proj(n)) * up_proj(n)),                      n = rmsnorm(h)

then a final RMSNorm and the LM head (the embedding matrix itself when embeddings are tied).
RMSNorm(x) = w * x / sqrt(mean(x^2) + eps), computed in float32. Attention is grouped-query
(Ainslie et al. 2023): query head j reads key/value head j // (heads / kv_heads); scores are
q.k / sqrt(head_dim), softmax in float32, masked causally and on padding keys.

Parameters are a plain nested dict whose path is the HF tensor name split on "." with
"layers.{i}" spelled "layers_{i}", and each linear weight kept in the HF (out, in) orientation:

    params["model"]["layers_0"]["self_attn"]["q_proj"]["weight"]
        is the tensor  model.layers.0.self_attn.q_proj.weight

So loading and saving are renamings, and `jkarcher.merge`, `jax.grad` and optax act on the same
leaves that a checkpoint merge does. Matmuls run in the parameters' dtype.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jkarcher.models.config import ModelConfig
from jkarcher.models.rope import apply_rotary, rotary_angles

Params = dict


class Linear(nn.Module):
    """y = x W^T (+ b), with W stored as HF does: (out_features, in_features)."""

    in_features: int
    out_features: int
    use_bias: bool
    init_std: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(self.init_std)
        weight = self.param("weight", init, (self.out_features, self.in_features))
        y = jnp.einsum("...i,oi->...o", x, weight.astype(x.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.out_features,)).astype(x.dtype)
        return y


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps) over the last axis, normalized in float32 (Zhang & Sennrich
    2019); the result is cast back to x's dtype before the weight multiplies it."""

    size: int
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (self.size,))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(x.dtype) * normed.astype(x.dtype)


class Embedding(nn.Module):
    """Token embeddings, a (vocab, hidden) table; `attend` is the tied LM head h E^T."""

    vocab_size: int
    size: int
    init_std: float

    def setup(self):
        init = nn.initializers.normal(self.init_std)
        self.weight = self.param("weight", init, (self.vocab_size, self.size))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight, tokens, axis=0)

    def attend(self, hidden: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", hidden, self.weight.astype(hidden.dtype))


class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary embeddings."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, allowed):
        cfg = self.config
        heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        proj = functools.partial(Linear, cfg.hidden_size, init_std=cfg.initializer_range)
        q = proj(heads * head_dim, cfg.qkv_bias, name="q_proj")(x)
        k = proj(kv_heads * head_dim, cfg.qkv_bias, name="k_proj")(x)
        v = proj(kv_heads * head_dim, cfg.qkv_bias, name="v_proj")(x)
        batch, length = x.shape[:2]
        q = apply_rotary(q.reshape(batch, length, heads, head_dim), cos, sin)
        k = apply_rotary(k.reshape(batch, length, kv_heads, head_dim), cos, sin)
        v = v.reshape(batch, length, kv_heads, head_dim)
        q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) * head_dim**-0.5
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(batch, length, heads * head_dim)
        std = cfg.initializer_range
        return Linear(heads * head_dim, cfg.hidden_size, cfg.o_bias, std, name="o_proj")(out)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        std, bias = cfg.initializer_range, cfg.mlp_bias
        gate = Linear(cfg.hidden_size, cfg.intermediate_size, bias, std, name="gate_proj")(x)
        up = Linear(cfg.hidden_size, cfg.intermediate_size, bias, std, name="up_proj")(x)
        return Linear(cfg.intermediate_size, cfg.hidden_size, bias, std, name="down_proj")(
            jax.nn.silu(gate) * up
        )


class DecoderLayer(nn.Module):
    """One pre-norm block: attention then MLP, each added to the residual stream."""

    config: ModelConfig

    @nn.compact
    def __call__(self, h, cos, sin, allowed):
        cfg = self.config
        n = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, name="input_layernorm")(h)
        h = h + Attention(cfg, name="self_attn")(n, cos, sin, allowed)
        n = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, name="post_attention_layernorm")(h)
        return h + MLP(cfg, name="mlp")(n)


class Decoder(nn.Module):
    """Embeddings, the layers and the final norm: HF's `model.*` tensors."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range)
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        """The L + 1 hidden states: embeddings, then each layer's output, the last one normed."""
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        cos, sin = rotary_angles(positions, self.config)
        causal = jnp.tril(jnp.ones((tokens.shape[1], tokens.shape[1]), dtype=bool))
        allowed = causal[None] & mask[:, None, :].astype(bool)
        h = self.embed_tokens(tokens)
        hidden_states = [h]
        for layer in self.layers:
            h = layer(h, cos, sin, allowed)
            hidden_states.append(h)
        hidden_states[-1] = self.norm(h)
        return tuple(hidden_states)


class CausalLM(nn.Module):
    """Qwen2ForCausalLM / LlamaForCausalLM: `model` (the decoder) and `lm_head` unless tied."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.model = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, cfg.initializer_range)

    def __call__(self, tokens: jax.Array, mask: jax.Array):
        hidden_states = self.model(tokens, mask)
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(hidden_states[-1])
        else:
            logits = self.lm_head(hidden_states[-1])
        return logits, hidden_states


@functools.partial(jax.jit, static_argnums=0)
def forward(
    config: ModelConfig, params: Params, tokens: jax.Array, mask: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Logits [B, T, vocab] and the L + 1 hidden states [B, T, hidden] of a padded batch.

    Args:
      config: the architecture (static: one compilation per config and batch shape).
      params: the parameter pytree (see the module docstring for its layout).
      tokens: int token ids [B, T]; values at padding positions are ignored.
      mask: [B, T], 1 for real tokens and 0 for padding (left, right or whole rows).

    Positions count real tokens only (cumsum of the mask - 1), so a padded sequence gives the
    logits it gives alone. `hidden_states[0]` is the embedding output, `hidden_states[i]` the
    output of layer i, and `hidden_states[L]` the last layer's output after the final norm,
    the layout of HF's `output_hidden_states`. Outputs at padding positions are meaningless.
    """
    return CausalLM(config).apply({"params": params}, tokens, mask)


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters: weights ~ N(0, initializer_range^2), zero biases, unit norm weights."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = CausalLM(config).init(key, tokens, jnp.ones_like(tokens))["params"]
    return jax.tree.map(lambda leaf: leaf.astype(dtype), params)


def param_shapes(config: ModelConfig) -> Params:
    """The parameter pytree's structure with `jax.ShapeDtypeStruct` leaves, computed abstractly."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


@functools.partial(jax.jit, static_argnums=(0, 1))
def selected_hidden_states(
    config: ModelConfig, layers: tuple[int, ...], params: Params, tokens: jax.Array, mask: jax.Array
) -> jax.Array:
    """Only the hidden states `layers` (a tuple of indices into `forward`'s list), stacked:
    [len(layers), B, T, D].

    The rest of the computation that these do not need (the LM head, later layers) is dropped
    by the compiler, so memory holds just the chosen layers.
    """
    _, hidden_states = forward(config, params, tokens, mask)
    return jnp.stack([hidden_states[i] for i in layers])


@functools.partial(jax.jit, static_argnums=0)
def next_token_stats(config: ModelConfig, params: Params, tokens: jax.Array, mask: jax.Array):
    """Sums for perplexity and accuracy of predicting tokens[:, t + 1] from tokens[:, :t + 1].

    Returns float32 scalars (total negative log-likelihood, correct argmax predictions, number
    of predicted tokens), counting only targets whose own and previous positions are real.
    Perplexity is exp(nll / count), accuracy correct / count.
    """
    logits, _ = forward(config, params, tokens, mask)
    logits, targets = logits[:, :-1].astype(jnp.float32), tokens[:, 1:]
    weight = (mask[:, :-1] * mask[:, 1:]).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return -jnp.sum(target_log_probs * weight), jnp.sum(correct * weight), jnp.sum(weight)
