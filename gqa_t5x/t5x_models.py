"""T5X's EncoderDecoderModel, decoding without the per-step cross-attention cache copy.

T5X creates the decode cache from dummy inputs and passes the encoder output to every decode
step, so the network can only fill its cross-attention cache at the first step, behind a
`lax.cond` that copies the whole cross-attention cache at every step. This model fills those
caches from the encoder output once, before T5X's decode loop, and then decodes with
encoded=None, which reads them as stored (what gqa_t5x.decoding.greedy_decode does).
Everything else (training, scoring, beam search, sampling) is T5X's own.

Importable only where T5X is installed; gin_configs/t5x/model.gin binds it.
"""
from flax import traverse_util
import jax.numpy as jnp
from t5x import models

CROSS_ATTENTION = 'encoder_decoder_attention'  # the network's cross-attention modules


class EncoderDecoderModel(models.EncoderDecoderModel):
  """t5x.models.EncoderDecoderModel for gqa_t5x.network.Transformer (same arguments)."""

  def _compute_kv_cache(self, params, encoded_inputs, encoder_input_tokens,
                        decoder_input_tokens, prefill_decoder_prompt=False):
    """T5X's cache, with every cross-attention cache filled from `encoded_inputs`.

    One cached decoder step projects the encoder output into the cross-attention caches; only
    those are kept (the self-attention cache and the decoder's position stay at step 0), so
    under jit the rest of that step is dead code.
    """
    cache, initial_index = super()._compute_kv_cache(
        params, encoded_inputs, encoder_input_tokens, decoder_input_tokens,
        prefill_decoder_prompt)
    first_token = jnp.zeros_like(decoder_input_tokens[:, :1])
    _, variables = self.module.apply(
        {'params': params, 'cache': cache}, encoded_inputs, encoder_input_tokens, first_token,
        first_token, enable_dropout=False, decode=True,
        max_decode_length=decoder_input_tokens.shape[1], mutable=['cache'],
        method=self.module.decode)
    stepped = traverse_util.flatten_dict(variables['cache'])
    merged = {path: stepped[path] if CROSS_ATTENTION in path else value
              for path, value in traverse_util.flatten_dict(cache).items()}
    return traverse_util.unflatten_dict(merged), initial_index

  def _compute_logits_from_slice(self, decoding_state, params, encoded_inputs, raw_inputs,
                                 max_decode_length):
    """T5X's decode step with encoded=None: the cross-attention caches are read as stored."""
    del encoded_inputs  # already projected into the cache by _compute_kv_cache
    return super()._compute_logits_from_slice(decoding_state, params, None, raw_inputs,
                                              max_decode_length)
