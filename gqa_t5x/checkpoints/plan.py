"""Decides, from shapes alone, what a conversion does, and rejects requests that cannot work.

Every check runs before any array is read or any file is written, so a bad request costs
nothing and leaves nothing behind. The result is a new parameter dict of LazyTensors (pooled
key/value kernels, everything else passed through untouched) and the facts for the record.
--method=aligned then reads the converted key and value kernels once to fit their rotations
(kept, [k, d, d] per kernel), so the facts can say what alignment bought; every output tensor
is still computed on its own when it is read, and the query and out kernels carry the rotations.
"""
import dataclasses
import re

from gqa_t5x.checkpoints import alignment, pooling
from gqa_t5x.checkpoints.base import CheckpointError, LazyTensor


@dataclasses.dataclass(frozen=True)
class AttentionKind:
  name: str    # record key and suffix of the T5Config field num_<name>_kv_heads
  stack: str   # 'encoder' or 'decoder'
  module: str  # the attention module's name inside layers_<i>
  description: str

  def kernel(self, layer: int, projection: str) -> str:
    return f'{self.stack}/layers_{layer}/{self.module}/{projection}/kernel'


KINDS = (
    AttentionKind('encoder', 'encoder', 'attention', 'encoder self-attention'),
    AttentionKind('decoder_self', 'decoder', 'self_attention', 'decoder self-attention'),
    AttentionKind('decoder_cross', 'decoder', 'encoder_decoder_attention',
                  'decoder cross-attention'),
)
KIND_NAMES = tuple(kind.name for kind in KINDS)


@dataclasses.dataclass(frozen=True)
class Heads:
  """The attention geometry of one kind, read off its kernels."""
  layers: tuple[int, ...]
  num_heads: int     # query heads H
  num_kv_heads: int  # key/value heads k


def measure_heads(params: dict[str, LazyTensor], kind: AttentionKind, head_dim: int) -> Heads:
  """Counts layers and heads of `kind`; errors if kernels are missing or widths inconsistent."""
  pattern = re.compile(rf'{kind.stack}/layers_(\d+)/')
  layers = sorted({int(m.group(1)) for name in params if (m := pattern.match(name))})
  if not layers:
    raise CheckpointError(f'no {kind.description} parameters: expected '
                          f'{kind.kernel(0, "{query,key,value,out}")} and further layers')
  geometry = set()
  for layer in layers:
    shapes = {}
    for projection in ('query', 'key', 'value', 'out'):
      name = kind.kernel(layer, projection)
      if name not in params:
        raise CheckpointError(f'missing attention parameter {name} ({kind.description}); '
                              'expected a T5.1.1 encoder-decoder checkpoint')
      shapes[projection] = params[name].shape
    q_width, kv_width = shapes['query'][-1], shapes['key'][-1]
    for projection, width in (('query', q_width), ('key', kv_width)):
      if len(shapes[projection]) != 2 or width % head_dim:
        raise CheckpointError(
            f'{kind.kernel(layer, projection)} has shape {list(shapes[projection])}: its width '
            f'is not a multiple of head_dim {head_dim}; pass the right --head_dim or --gin_file')
    if shapes['value'] != shapes['key'] or shapes['out'][0] != q_width:
      raise CheckpointError(
          f'{kind.description} layer {layer}: inconsistent kernels {shapes}; expected key and '
          'value [emb, kv_heads*head_dim] and out [heads*head_dim, emb]')
    geometry.add((q_width // head_dim, kv_width // head_dim))
  if len(geometry) > 1:
    raise CheckpointError(f'{kind.description}: layers disagree on (heads, kv heads): '
                          f'{sorted(geometry)}')
  (num_heads, num_kv_heads), = geometry
  relpos = params.get(f'{kind.stack}/relpos_bias/rel_embedding')
  if relpos is not None and relpos.shape[0] != num_heads:
    raise CheckpointError(
        f'{kind.description}: query kernels are {num_heads} heads x head_dim {head_dim} but '
        f'{kind.stack}/relpos_bias has {relpos.shape[0]} heads; kernel widths are inconsistent '
        f'with heads*head_dim (is head_dim {num_heads * head_dim // relpos.shape[0]}?)')
  return Heads(tuple(layers), num_heads, num_kv_heads)


def plan(params: dict[str, LazyTensor], kv_heads: dict[str, int], *, head_dim: int,
         method: str, seed: int = 0, num_heads: int | None = None, progress=None
         ) -> tuple[dict[str, LazyTensor], dict]:
  """Returns (converted params, record facts) for the requested kv heads per kind name.

  num_heads, if given (from a model config), must match the heads found in the checkpoint.
  progress(num_tensors, total_bytes), if given, returns an update(name, nbytes) callback for the
  kernels that --method=aligned reads to fit its rotations.
  """
  if method not in pooling.METHODS:
    raise CheckpointError(f'unknown method {method!r}; expected one of {pooling.METHODS}')
  geometry, changed = {}, []
  for kind in KINDS:
    if kind.name not in kv_heads and kind.kernel(0, 'key') not in params:
      continue  # Not asked for and not present (e.g. a decoder without cross-attention).
    heads = measure_heads(params, kind, head_dim)
    if num_heads is not None and heads.num_heads != num_heads:
      raise CheckpointError(
          f'{kind.description} has {heads.num_heads} heads of head_dim {head_dim} but the model '
          f'config says num_heads {num_heads}: kernel widths are inconsistent with the config')
    target = kv_heads.get(kind.name, heads.num_kv_heads)
    valid = [g for g in range(1, heads.num_kv_heads + 1) if heads.num_kv_heads % g == 0]
    if target not in valid:
      raise CheckpointError(
          f'{target} kv heads does not divide the {heads.num_kv_heads} kv heads of '
          f'{kind.description} ({heads.num_heads} query heads); valid: '
          f'{", ".join(map(str, valid))}')
    geometry[kind.name] = (heads, target)
    if target == heads.num_kv_heads:
      continue
    changed.append(kind)
  grouped = [n for n, (h, g) in geometry.items() if n in kv_heads and g < h.num_heads]
  if not changed and grouped:
    raise CheckpointError(
        'nothing to convert: the checkpoint already has the requested kv heads ('
        + ', '.join(f'{n}: {geometry[n][1]} of {geometry[n][0].num_heads} heads' for n in grouped)
        + '); pick fewer kv heads, or convert the original MHA checkpoint')
  converted = dict(params)
  if method == 'aligned':
    distances = _align(params, converted, changed, geometry, head_dim, progress)
  else:
    distances = None
    for kind in changed:
      for layer in geometry[kind.name][0].layers:
        for projection in ('key', 'value'):
          name = kind.kernel(layer, projection)
          converted[name] = _pooled(name, params[name], geometry[kind.name][1], head_dim,
                                    method, seed)
  return converted, _facts(params, converted, geometry, head_dim, method, seed, distances)


def _align(params, converted, kinds, geometry, head_dim, progress) -> dict:
  """Fits key and value rotations per layer; replaces q, k, v, o of `kinds` in `converted`.

  Returns the record's distances: {kind: [{'layer': i, 'key': {'mean': .., 'aligned': ..},
  'value': {..}}, ...]}. Key rotations also turn the query kernel, value rotations the out one.
  """
  fitted = [(kind, layer, projection) for kind in kinds
            for layer in geometry[kind.name][0].layers for projection in ('key', 'value')]
  update = (progress(len(fitted), sum(params[k.kernel(i, p)].nbytes for k, i, p in fitted))
            if progress else lambda name, nbytes: None)
  distances = {kind.name: {} for kind in kinds}
  for kind, layer, projection in fitted:
    name, target = kind.kernel(layer, projection), geometry[kind.name][1]
    rotations, distance = alignment.fit(params[name].read(), num_kv_heads=target,
                                        head_dim=head_dim)
    distances[kind.name].setdefault(layer, {'layer': layer})[projection] = distance
    converted[name] = _pooled(name, _rotated(params[name], rotations, head_dim), target,
                              head_dim, 'mean', 0)
    partner = kind.kernel(layer, 'query' if projection == 'key' else 'out')
    converted[partner] = _rotated(params[partner], rotations, head_dim,
                                  rows=projection == 'value')
    update(name, params[name].nbytes)
  return {kind: list(layers.values()) for kind, layers in distances.items()}


def _rotated(source: LazyTensor, rotations, head_dim, rows=False) -> LazyTensor:
  return LazyTensor(source.shape, source.dtype, lambda: alignment.rotate(
      source.read(), rotations, head_dim=head_dim, rows=rows))


def _pooled(name, source: LazyTensor, num_kv_heads, head_dim, method, seed) -> LazyTensor:
  def read():
    # 'random' needs no source values; reading them anyway keeps one code path for all methods.
    return pooling.pool_kv_kernel(source.read(), num_kv_heads=num_kv_heads, head_dim=head_dim,
                                  method=method, seed=seed, name=name)
  return LazyTensor((source.shape[0], num_kv_heads * head_dim), source.dtype, read)


def _facts(before, after, geometry, head_dim, method, seed, distances) -> dict:
  def cache_bytes(kind_name, index):
    # Keys + values cached per token, all layers; self: per decoder token, cross: per encoder one.
    heads, target = geometry[kind_name]
    kv = (heads.num_kv_heads, target)[index]
    return 2 * len(heads.layers) * kv * head_dim * 2  # bfloat16 activations (T5.1.1 default)

  cached = [n for n in ('decoder_self', 'decoder_cross') if n in geometry]
  return {
      'method': method,
      **({'seed': seed} if method == 'random' else {}),
      'head_dim': head_dim,
      'attention': {n: {'heads': h.num_heads, 'layers': len(h.layers),
                        'kv_heads_before': h.num_kv_heads, 'kv_heads_after': g}
                    for n, (h, g) in geometry.items()},
      'param_count': {'before': sum(t.size for t in before.values()),
                      'after': sum(t.size for t in after.values())},
      'kv_cache_bytes_per_token_bfloat16': {
          n: {'before': cache_bytes(n, 0), 'after': cache_bytes(n, 1)} for n in cached},
      **({'alignment': {'measure': alignment.MEASURE, **distances}} if distances else {}),
  }
