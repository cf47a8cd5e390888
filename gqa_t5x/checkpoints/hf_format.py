"""Reads HuggingFace T5 checkpoints (`T5ForConditionalGeneration.save_pretrained` directories).

A directory holds config.json and model.safetensors or pytorch_model.bin, or shards of either
listed by model.safetensors.index.json / pytorch_model.bin.index.json. Tensors are renamed to
T5X's flat parameter names and transposed from PyTorch's [out, in] to T5X's [in, out] when read,
one at a time: safetensors files are opened per tensor, and PyTorch files are memory-mapped.
The config also yields the network's T5Config fields, so the converted checkpoint comes with a
model gin that matches it.

What the network computes differently from HuggingFace's T5 is refused, not approximated:
other layer-norm epsilons, activations other than gelu_new (T5.1.1's `gated-gelu`), relu or
silu, and models other than T5 encoder-decoders.
"""
import json
import os

import ml_dtypes  # registers bfloat16 with numpy, which safetensors' numpy reader relies on
import numpy as np
from etils import epath
from safetensors import SafetensorError, safe_open

from gqa_t5x.checkpoints.base import Checkpoint, CheckpointError, LazyTensor

CONFIG_FILE = 'config.json'
# (single file, index of shards) per weight format, in the order HuggingFace prefers them.
WEIGHT_FILES = {'safetensors': ('model.safetensors', 'model.safetensors.index.json'),
                'PyTorch': ('pytorch_model.bin', 'pytorch_model.bin.index.json')}
MODEL_TYPES = ('t5', 'mt5')  # mT5 is T5.1.1's architecture under another name
ARCHITECTURES = ('T5ForConditionalGeneration', 'MT5ForConditionalGeneration')
# HuggingFace's dense_act_fn -> the flax.linen activation the network applies. HF's "gelu" is
# the exact erf form, which the network (tanh-approximate nn.gelu) does not compute.
ACTIVATIONS = {'gelu_new': 'gelu', 'relu': 'relu', 'silu': 'silu'}
LAYER_NORM_EPSILON = 1e-6  # gqa_t5x.layers.RMSNorm's
_SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
                       'BF16': ml_dtypes.bfloat16}


def is_hf(path: epath.Path) -> bool:
  return (path / CONFIG_FILE).is_file()


def read(path: epath.Path) -> Checkpoint:
  """Returns the T5X-named parameters (step 0), the HF config and the network fields it implies."""
  if '://' in os.fspath(path):
    raise CheckpointError(f'{path}: HuggingFace checkpoints are read from a local directory; '
                          'copy it to local disk first')
  config = _read_config(path / CONFIG_FILE)
  model = model_config(config, path / CONFIG_FILE)
  weight_format, tensors = _open_weights(path)
  # transformers scales the decoder output by d_model**-0.5 for original T5 (tied) configs and
  # uses lm_head.weight if the checkpoint has its own, else the shared embedding.
  scale, own_lm_head = _scales_logits(config), 'lm_head.weight' in tensors
  model['logits_via_embedding'] = scale and not own_lm_head
  params, used = {}, set()
  for hf_name, t5x_name, transpose in _parameter_names(model):
    if hf_name == 'lm_head.weight' and not own_lm_head:
      hf_name = 'shared.weight'  # saved tied: transformers drops the duplicate
    if hf_name not in tensors:
      raise CheckpointError(f'{path} has no tensor {hf_name} ({weight_format} weights); expected '
                            f'every parameter of a {ARCHITECTURES[0]} with this {CONFIG_FILE}')
    used.add(hf_name)
    params[t5x_name] = _transposed(tensors[hf_name]) if transpose else tensors[hf_name]
  unexpected = sorted(set(tensors) - used - set(_EMBEDDING_COPIES) - {_UNUSED_RELPOS})
  if unexpected:
    more = f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''
    raise CheckpointError(f'{path} has tensor {unexpected[0]}{more} that a {ARCHITECTURES[0]} '
                          f'with this {CONFIG_FILE} does not have')
  _check_copies(path, tensors)
  if scale and own_lm_head:  # the network scales only embedding logits: fold it into the kernel
    params['decoder/logits_dense/kernel'] = _scaled(params['decoder/logits_dense/kernel'],
                                                    model['emb_dim'] ** -0.5)
  return Checkpoint(os.fspath(path), f'HuggingFace T5 ({weight_format})', params, np.asarray(0),
                    model_config=model, source_config=config)


def _read_config(path: epath.Path) -> dict:
  try:
    config = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f'{path} is not JSON ({e}); expected a HuggingFace config.json') from e
  if not isinstance(config, dict):
    raise CheckpointError(f'{path} is not a JSON object; expected a HuggingFace config.json')
  return config


def model_config(config: dict, where) -> dict:
  """The gqa_t5x.network.T5Config fields of a HuggingFace T5 config, but logits_via_embedding.

  Defaults are transformers' T5Config defaults, for keys an older config.json leaves out.
  """
  model_type = config.get('model_type')
  architectures = config.get('architectures') or list(ARCHITECTURES[:1])
  if model_type not in MODEL_TYPES or not config.get('is_encoder_decoder', True):
    raise CheckpointError(
        f'{where} describes a {model_type!r} model (architectures {architectures}); only T5 '
        f'encoder-decoders are supported (model_type {" or ".join(MODEL_TYPES)}, '
        f'{ARCHITECTURES[0]})')
  if not set(architectures) & set(ARCHITECTURES):
    raise CheckpointError(f'{where} is a {architectures[0]}; only the full encoder-decoder with '
                          f'its language-model head ({ARCHITECTURES[0]}) can be converted')
  epsilon = config.get('layer_norm_epsilon', LAYER_NORM_EPSILON)
  if epsilon != LAYER_NORM_EPSILON:
    raise CheckpointError(f'{where}: layer_norm_epsilon {epsilon} is not supported; the network '
                          f'normalises with epsilon {LAYER_NORM_EPSILON} (T5\'s)')
  projection = config.get('feed_forward_proj', 'relu')
  *gated, activation = projection.split('-')
  # transformers' own mapping (T5Config.__post_init__): gated-gelu means the tanh approximation.
  activation = 'gelu_new' if projection == 'gated-gelu' else activation
  if gated not in ([], ['gated']) or activation not in ACTIVATIONS:
    raise CheckpointError(
        f'{where}: feed_forward_proj {projection!r} is not supported (the network has no exact '
        'erf GELU); expected gated-gelu, relu, gated-relu, silu or gated-silu')
  layers = config.get('num_layers', 6)
  return {'vocab_size': config.get('vocab_size', 32128), 'emb_dim': config.get('d_model', 512),
          'num_heads': config.get('num_heads', 8), 'num_encoder_layers': layers,
          'num_decoder_layers': config.get('num_decoder_layers') or layers,
          'head_dim': config.get('d_kv', 64), 'mlp_dim': config.get('d_ff', 2048),
          'mlp_activations': (ACTIVATIONS[activation],) + (('linear',) if gated else ()),
          'num_relpos_buckets': config.get('relative_attention_num_buckets', 32),
          'relpos_max_distance': config.get('relative_attention_max_distance', 128)}


def _scales_logits(config: dict) -> bool:
  """transformers' T5Config.scale_decoder_outputs, also for configs saved before it existed."""
  return config.get('scale_decoder_outputs', config.get('tie_word_embeddings', True) is not False)


# --- names ---------------------------------------------------------------------------------------

_ATTENTION = (('q', 'query'), ('k', 'key'), ('v', 'value'), ('o', 'out'))
# Per stack, the HF sub-layers of a block in order: (HF module, T5X module, T5X norm before it).
_SUBLAYERS = {
    'encoder': (('SelfAttention', 'attention', 'pre_attention_layer_norm'),),
    'decoder': (('SelfAttention', 'self_attention', 'pre_self_attention_layer_norm'),
                ('EncDecAttention', 'encoder_decoder_attention',
                 'pre_cross_attention_layer_norm')),
}
# Saved by some writers as copies of shared.weight (transformers ties them to it when equal).
_EMBEDDING_COPIES = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')
# In old checkpoints; T5 never uses it (transformers ignores it when loading, too).
_UNUSED_RELPOS = 'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight'


def _parameter_names(model: dict):
  """Yields (HF name, T5X name, transpose?) for every parameter of the network `model` describes."""
  wi = ('wi_0', 'wi_1') if len(model['mlp_activations']) > 1 else ('wi',)
  mlp = ('DenseReluDense', 'mlp', 'pre_mlp_layer_norm', [(n, n) for n in wi + ('wo',)])
  yield 'shared.weight', 'token_embedder/embedding', False
  for stack, attentions in _SUBLAYERS.items():
    yield (f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
           f'{stack}/relpos_bias/rel_embedding', True)  # [buckets, heads] -> [heads, buckets]
    sublayers = [(*attention, _ATTENTION) for attention in attentions] + [mlp]
    for i in range(model[f'num_{stack}_layers']):
      for j, (hf_module, module, norm, projections) in enumerate(sublayers):
        hf, t5x = f'{stack}.block.{i}.layer.{j}', f'{stack}/layers_{i}'
        yield f'{hf}.layer_norm.weight', f'{t5x}/{norm}/scale', False
        for hf_projection, projection in projections:
          yield (f'{hf}.{hf_module}.{hf_projection}.weight',
                 f'{t5x}/{module}/{projection}/kernel', True)
    yield f'{stack}.final_layer_norm.weight', f'{stack}/{stack}_norm/scale', False
  if not model['logits_via_embedding']:
    yield 'lm_head.weight', 'decoder/logits_dense/kernel', True


def _check_copies(path: epath.Path, tensors: dict[str, LazyTensor]) -> None:
  """Refuses embedding copies that differ from shared.weight (transformers would use them).

  Reads the embedding and its copies now, before anything is written; most checkpoints have no
  copies (safetensors files) or share their storage (PyTorch files), and cost nothing here.
  """
  copies = [name for name in _EMBEDDING_COPIES if name in tensors]
  shared = tensors['shared.weight'].read() if copies else None
  for name in copies:
    if not np.array_equal(tensors[name].read(), shared):
      raise CheckpointError(f'{path}: {name} differs from shared.weight; the network has one '
                            'token embedding for encoder and decoder, as T5 has')


def _transposed(tensor: LazyTensor) -> LazyTensor:
  """PyTorch's [out, in] as T5X's [in, out]: a view, copied only by whoever writes it."""
  return LazyTensor(tensor.shape[::-1], tensor.dtype, lambda: tensor.read().T)


def _scaled(tensor: LazyTensor, factor: float) -> LazyTensor:
  def read():
    array = tensor.read()
    return np.multiply(array, factor, dtype=np.promote_types(array.dtype, np.float32)).astype(
        array.dtype)
  return LazyTensor(tensor.shape, tensor.dtype, read)


# --- weight files --------------------------------------------------------------------------------

def _open_weights(path: epath.Path) -> tuple[str, dict[str, LazyTensor]]:
  """('safetensors' or 'PyTorch', every tensor of the single file or of all shards)."""
  for weight_format, (single, index) in WEIGHT_FILES.items():
    if (path / single).is_file():
      files, expected = [path / single], None
    elif (path / index).is_file():
      files, expected = _shards(path / index)
    else:
      continue
    opener = _open_safetensors if weight_format == 'safetensors' else _open_torch
    tensors = {}
    for file in files:
      tensors.update(opener(file))
    missing = sorted(set(expected or ()) - set(tensors))
    if missing:
      raise CheckpointError(f'{path / index} puts {missing[0]} in {expected[missing[0]]}, which '
                            'does not hold it; the shards do not match their index')
    return weight_format, tensors
  names = ', '.join(name for pair in WEIGHT_FILES.values() for name in pair)
  raise CheckpointError(f'{path} has {CONFIG_FILE} but no weights: expected one of {names}')


def _shards(index: epath.Path) -> tuple[list[epath.Path], dict[str, str]]:
  """The shard files an index names (all present) and its tensor -> shard map."""
  try:
    weight_map = json.loads(index.read_text())['weight_map']
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f'{index} is not a HuggingFace shard index with a weight_map') from e
  shards = sorted(set(weight_map.values()))
  missing = [name for name in shards if not (index.parent / name).is_file()]
  if missing:
    raise CheckpointError(f'{index} names shard {missing[0]}, which is missing from '
                          f'{index.parent} ({len(missing)} of {len(shards)} shards missing)')
  return [index.parent / name for name in shards], weight_map


def _open_safetensors(file: epath.Path) -> dict[str, LazyTensor]:
  """Shapes and dtypes from the header; each read opens the file for that one tensor."""
  try:
    with safe_open(os.fspath(file), framework='numpy') as f:
      headers = {name: f.get_slice(name) for name in f.keys()}
      specs = {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in headers.items()}
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f'{file} is not a readable safetensors file ({e})') from e

  def lazy(name, shape, dtype):
    if dtype not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f'{file}: tensor {name} has dtype {dtype}; expected a float dtype '
                            f'({", ".join(_SAFETENSORS_DTYPES)})')

    def read():
      with safe_open(os.fspath(file), framework='numpy') as f:
        return f.get_tensor(name)
    return LazyTensor(shape, np.dtype(_SAFETENSORS_DTYPES[dtype]), read)
  return {name: lazy(name, *spec) for name, spec in specs.items()}


def _open_torch(file: epath.Path) -> dict[str, LazyTensor]:
  """Memory-maps a PyTorch state dict (weights only: no pickled code runs).

  Tensors that share storage with an earlier one (a .bin of a tied model saves shared.weight,
  the embed_tokens and lm_head.weight as one storage) are left out, as transformers' safetensors
  files leave them out: lm_head.weight then falls back to shared.weight.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointError(f'{file} is a PyTorch checkpoint, which needs torch installed '
                          '(pip install torch); safetensors checkpoints need no torch') from e
  try:
    state = torch.load(os.fspath(file), map_location='cpu', mmap=True, weights_only=True)
  except (RuntimeError, OSError, ValueError) as e:  # pickle errors are RuntimeErrors here
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointError(f'{file} is not a readable PyTorch state dict ({reason})') from e
  tensors, seen = {}, set()
  for name, tensor in state.items():
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
      raise CheckpointError(f'{file}: {name} is not a float tensor; expected a model state dict')
    where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape,
             tensor.stride())
    if where in seen:
      continue
    seen.add(where)
    tensors[name] = LazyTensor(tuple(tensor.shape), _numpy(tensor.reshape(-1)[:0]).dtype,
                               lambda tensor=tensor: _numpy(tensor))
  return tensors


def _numpy(tensor) -> np.ndarray:
  """A view of a CPU tensor's memory (numpy has no bfloat16: its bits are reinterpreted)."""
  import torch  # pylint: disable=g-import-not-at-top
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()
