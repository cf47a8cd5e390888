"""The peer: HuggingFace transformers' T5 (PyTorch) greedy `generate` on the same MHA model.

Why: a widely used implementation of the same network is the fair yardstick for "our MHA is not
slow" (so GQA's gain is not measured against a weak baseline). torch and transformers are
optional: they are imported here only, and only when the peer is asked for.
"""
from gqa_t5x.benchmark.roofline import Geometry

NOT_INSTALLED = 'not installed'


def version() -> str:
  """'transformers X / torch Y', or NOT_INSTALLED when either import fails."""
  try:
    import torch
    import transformers
  except ImportError:
    return NOT_INSTALLED
  return f'transformers {transformers.__version__} / torch {torch.__version__}'


def build(g: Geometry, num_encoder_layers: int, dtype_name: str, device: str, seed: int = 0):
  """Returns (run, peak_bytes) for T5ForConditionalGeneration built from a config (random weights,
  no download) with H = G heads; run() generates exactly output_length tokens greedily.

  peak_bytes is torch's CUDA peak allocation on a GPU, None on CPU (torch does not track it).
  """
  import torch
  import transformers

  config = transformers.T5Config(
      vocab_size=g.vocab_size, d_model=g.emb_dim, d_kv=g.head_dim, d_ff=g.mlp_dim,
      num_layers=num_encoder_layers, num_decoder_layers=g.num_decoder_layers,
      num_heads=g.num_heads, feed_forward_proj='gated-gelu', tie_word_embeddings=False,
      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(config).to(
      device=device, dtype=getattr(torch, dtype_name)).eval()
  tokens = torch.randint(2, g.vocab_size, (g.batch, g.input_length), device=device)
  generate = lambda: model.generate(
      input_ids=tokens, attention_mask=torch.ones_like(tokens), do_sample=False, num_beams=1,
      max_new_tokens=g.output_length, min_new_tokens=g.output_length)  # min: EOS is suppressed

  def run():
    with torch.inference_mode():
      out = generate()
    if device.startswith('cuda'):
      torch.cuda.synchronize()
    return out

  if not device.startswith('cuda'):
    return run, None
  torch.cuda.reset_peak_memory_stats()
  run()
  return run, torch.cuda.max_memory_allocated()
