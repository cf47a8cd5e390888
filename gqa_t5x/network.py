"""T5.1.1 encoder-decoder with grouped-query attention, honouring T5X's module contract.

Drop-in for t5x/examples/t5/network.py under `t5x.models.EncoderDecoderModel`: same methods
(`__call__`, `encode`, `decode`), argument names and, for an MHA config, the same parameter tree.
GQA changes only the key/value kernel widths (G * head_dim) and the decode cache (G heads).
"""
from typing import Any, Sequence

from flax import linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from gqa_t5x.attention import GroupedQueryAttention, check_kv_heads
from gqa_t5x.layers import Embed, Kernel, MlpBlock, RelativePositionBias, RMSNorm, step_dense
from gqa_t5x import axes

Array = jax.Array


@struct.dataclass
class T5Config:
  """Hyper-parameters of the network (T5X's T5Config plus one kv-head count per attention kind).

  A kv-head count of None means MHA (= num_heads). The paper converts decoder self- and
  cross-attention and keeps the encoder MHA.
  """
  vocab_size: int
  dtype: Any = jnp.float32
  emb_dim: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 2048
  mlp_activations: Sequence[str] = ('gelu', 'linear')
  dropout_rate: float = 0.1
  logits_via_embedding: bool = False
  float32_attention_logits: bool = False
  num_encoder_kv_heads: int | None = None
  num_decoder_self_kv_heads: int | None = None
  num_decoder_cross_kv_heads: int | None = None
  num_relpos_buckets: int = 32
  relpos_max_distance: int = 128
  # Cached float32 decode steps on CPU run their self- and cross-attention, projections, MLP and
  # logits with gqa_t5x.cpu_kernels; False keeps XLA's ops. Both agree to float32 rounding.
  cpu_decode_kernels: bool = True

  def __post_init__(self):
    for field in ('num_encoder_kv_heads', 'num_decoder_self_kv_heads',
                  'num_decoder_cross_kv_heads'):
      check_kv_heads(self.num_heads, getattr(self, field) or self.num_heads, f'T5Config.{field}')

  @property
  def encoder_kv_heads(self) -> int:
    return self.num_encoder_kv_heads or self.num_heads

  @property
  def decoder_self_kv_heads(self) -> int:
    return self.num_decoder_self_kv_heads or self.num_heads

  @property
  def decoder_cross_kv_heads(self) -> int:
    return self.num_decoder_cross_kv_heads or self.num_heads

  @property
  def kv_head_counts(self) -> tuple[int, int, int]:
    return self.encoder_kv_heads, self.decoder_self_kv_heads, self.decoder_cross_kv_heads


def make_attention_mask(query_input: Array, key_input: Array, pairwise_fn=jnp.multiply) -> Array:
  """[b, t] and [b, s] -> mask [b, 1, t, s] (1 = attend)."""
  mask = pairwise_fn(query_input[:, :, None], key_input[:, None, :])
  return mask[:, None].astype(jnp.float32)


def make_decoder_mask(decoder_target_tokens: Array, decoder_segment_ids: Array | None) -> Array:
  """Causal, non-padding and (for packed examples) same-segment mask [b, 1, t, t]."""
  length = decoder_target_tokens.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), jnp.float32))[None, None]
  mask = make_attention_mask(decoder_target_tokens > 0, decoder_target_tokens > 0) * causal
  if decoder_segment_ids is not None:
    mask = mask * make_attention_mask(decoder_segment_ids, decoder_segment_ids, jnp.equal)
  return mask


def attention(cfg: T5Config, kv_heads: int, name: str,
              cross: bool = False) -> GroupedQueryAttention:
  """A sub-layer's attention with the config's heads, dtype and dropout."""
  return GroupedQueryAttention(cfg.num_heads, kv_heads, cfg.head_dim, cross_attention=cross,
                               dtype=cfg.dtype, dropout_rate=cfg.dropout_rate,
                               float32_logits=cfg.float32_attention_logits,
                               decode_kernels=cfg.cpu_decode_kernels, name=name)


def mlp(cfg: T5Config) -> MlpBlock:
  return MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, cfg.dtype,
                  decode_kernels=cfg.cpu_decode_kernels, name='mlp')


class EncoderLayer(nn.Module):
  """Pre-norm self-attention and gated MLP, each with a residual connection."""
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, mask: Array, bias: Array, deterministic: bool) -> Array:
    cfg = self.config
    dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    y = RMSNorm(dtype=cfg.dtype, name='pre_attention_layer_norm')(x)
    y = attention(cfg, cfg.encoder_kv_heads, 'attention')(
        y, y, mask, bias, deterministic=deterministic)
    x = x + dropout(y, deterministic)
    y = RMSNorm(dtype=cfg.dtype, name='pre_mlp_layer_norm')(x)
    return x + dropout(mlp(cfg)(y, deterministic), deterministic)


class DecoderLayer(nn.Module):
  """Pre-norm self-attention (GQA), cross-attention (GQA) and gated MLP; with y=None (decode
  only) it fills the cross-attention cache from `encoded` and returns None."""
  config: T5Config

  @nn.compact
  def __call__(self, y: Array | None, encoded: Array | None, self_mask: Array | None,
               self_bias: Array, cross_mask: Array, deterministic: bool, decode: bool) -> Array:
    cfg = self.config
    cross_attention = attention(cfg, cfg.decoder_cross_kv_heads, 'encoder_decoder_attention',
                                cross=True)
    if y is None:  # fill the cross-attention cache only
      return cross_attention(None, encoded, decode=True)
    dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    z = RMSNorm(dtype=cfg.dtype, name='pre_self_attention_layer_norm')(y)
    z = attention(cfg, cfg.decoder_self_kv_heads, 'self_attention')(
        z, z, self_mask, self_bias, deterministic=deterministic, decode=decode)
    y = y + dropout(z, deterministic)
    z = RMSNorm(dtype=cfg.dtype, name='pre_cross_attention_layer_norm')(y)
    z = cross_attention(z, encoded, cross_mask, deterministic=deterministic, decode=decode)
    y = y + dropout(z, deterministic)
    z = RMSNorm(dtype=cfg.dtype, name='pre_mlp_layer_norm')(y)
    return y + dropout(mlp(cfg)(z, deterministic, decode), deterministic)


class Encoder(nn.Module):
  """Embedding, a stack of EncoderLayers sharing one relative position bias, final norm."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens: Array, mask: Array, deterministic: bool) -> Array:
    cfg = self.config
    length = tokens.shape[-1]
    positions = jnp.arange(length)
    bias = RelativePositionBias(cfg.num_heads, True, cfg.num_relpos_buckets,
                                cfg.relpos_max_distance, cfg.dtype,
                                name='relpos_bias')(positions, positions)
    dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    x = dropout(self.shared_embedding(tokens), deterministic)
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, name=f'layers_{i}')(x, mask, bias, deterministic)
    x = RMSNorm(dtype=cfg.dtype, name='encoder_norm')(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic)


class Decoder(nn.Module):
  """Embedding, DecoderLayers sharing one causal relative position bias, norm and logits.

  In decode mode the decoder keeps its own `cache_index` (the position being decoded), so the
  relative position bias is computed for that one query row, not for a [max_len, max_len] grid.
  tokens=None only fills every layer's cross-attention cache (fill_cross_attention_cache).
  """
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded: Array | None, tokens: Array | None, self_mask: Array | None,
               cross_mask: Array, deterministic: bool, decode: bool,
               max_decode_length: int | None) -> Array:
    cfg = self.config
    if tokens is None:  # fill the cross-attention caches only
      for i in range(cfg.num_decoder_layers):
        DecoderLayer(cfg, name=f'layers_{i}')(None, encoded, None, None, None,
                                              deterministic=True, decode=True)
      return None
    relpos = RelativePositionBias(cfg.num_heads, False, cfg.num_relpos_buckets,
                                  cfg.relpos_max_distance, cfg.dtype, name='relpos_bias')
    cache_ready = decode and self.has_variable('cache', 'cache_index')
    if decode:
      index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
    if cache_ready:
      if max_decode_length is None:
        raise ValueError('Decoder.decode with decode=True needs max_decode_length (the length '
                         'the cache was created with).')
      self_bias = relpos(index.value[None], jnp.arange(max_decode_length))  # [1, h, 1, L]
      index.value = index.value + 1
    else:
      positions = jnp.arange(tokens.shape[-1])
      self_bias = relpos(positions, positions)  # [1, h, t, t]

    dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    y = dropout(self.shared_embedding(tokens), deterministic)
    for i in range(cfg.num_decoder_layers):
      y = DecoderLayer(cfg, name=f'layers_{i}')(y, encoded, self_mask, self_bias, cross_mask,
                                                deterministic, decode)
    y = RMSNorm(dtype=cfg.dtype, name='decoder_norm')(y)
    y = dropout(y, deterministic)
    if cfg.logits_via_embedding:
      embedding = self.shared_embedding.variables['params']['embedding']
      return jnp.einsum('bte,ve->btv', y.astype(jnp.float32), embedding) / jnp.sqrt(y.shape[-1])
    # float32 logits for stability, as T5X.
    kernel = Kernel((cfg.emb_dim, cfg.vocab_size), (axes.EMBED, axes.VOCAB), name='logits_dense')()
    if cache_ready and cfg.cpu_decode_kernels and y.shape[1] == 1:
      return step_dense(y.astype(jnp.float32), kernel.astype(jnp.float32))
    return jnp.einsum('bte,ev->btv', y.astype(jnp.float32), kernel)


class Transformer(nn.Module):
  """The encoder-decoder model: `t5x.models.EncoderDecoderModel`'s `module`."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.shared_embedding = Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype, name='token_embedder')
    self.encoder = Encoder(cfg, self.shared_embedding)
    self.decoder = Decoder(cfg, self.shared_embedding)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             enable_dropout: bool = True) -> Array:
    """[b, s] tokens -> [b, s, e] encoded (padding id 0 is masked)."""
    mask = make_attention_mask(encoder_input_tokens > 0, encoder_input_tokens > 0)
    if encoder_segment_ids is not None:
      mask = mask * make_attention_mask(encoder_segment_ids, encoder_segment_ids, jnp.equal)
    return self.encoder(encoder_input_tokens, mask, deterministic=not enable_dropout)

  def decode(self, encoded: Array | None, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Array, encoder_segment_ids: Array | None = None,
             decoder_segment_ids: Array | None = None, decoder_positions: Array | None = None,
             enable_dropout: bool = True, decode: bool = False,
             max_decode_length: int | None = None) -> Array:
    """Decoder logits [b, t, vocab]; with decode=True, one cached step ([b, 1] -> [b, 1, vocab]).

    In a cached step, encoded=None reads the cross-attention keys/values that
    fill_cross_attention_cache or the first step projected (T5X passes `encoded` every time,
    which works too).
    """
    del decoder_positions  # relative positions come from token order, as in T5X's T5.1.1.
    if decode:
      if encoder_segment_ids is not None:
        raise ValueError('Packed inputs (encoder_segment_ids) cannot be used with decode=True.')
      self_mask = None  # the self-attention cache masks positions not yet decoded
      cross_mask = make_attention_mask(jnp.ones_like(decoder_target_tokens),
                                       encoder_input_tokens > 0)
    else:
      self_mask = make_decoder_mask(decoder_target_tokens, decoder_segment_ids)
      cross_mask = make_attention_mask(decoder_target_tokens > 0, encoder_input_tokens > 0)
      if encoder_segment_ids is not None:
        cross_mask = cross_mask * make_attention_mask(decoder_segment_ids, encoder_segment_ids,
                                                      jnp.equal)
    return self.decoder(encoded, decoder_input_tokens, self_mask, cross_mask,
                        deterministic=not enable_dropout, decode=decode,
                        max_decode_length=max_decode_length)

  def fill_cross_attention_cache(self, encoded: Array) -> None:
    """Projects encoded [b, s, e] into every decoder layer's cross-attention cache (apply with
    a cache from decoding.init_cache and mutable=['cache']); decode steps then pass encoded=None
    from the first on."""
    self.decoder(encoded, None, None, None, deterministic=True, decode=True,
                 max_decode_length=None)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array, encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None, encoder_positions: Array | None = None,
               decoder_positions: Array | None = None, *, enable_dropout: bool = True,
               decode: bool = False) -> Array:
    """Teacher-forced logits [b, t, vocab] (decode=True with mutable=['cache'] creates the cache)."""
    del encoder_positions  # see decode()
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                       encoder_segment_ids, decoder_segment_ids, decoder_positions,
                       enable_dropout=enable_dropout, decode=decode)
