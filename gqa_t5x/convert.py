r"""Turns an MHA T5 checkpoint into a GQA checkpoint by pooling key/value heads (GQA paper, §2.1).

  gqa-t5x-convert --input=gs://t5-data/pretrained_models/t5x/t5_1_1_large/checkpoint_1000000 \
      --output=/ckpts/gqa8_large/checkpoint_1000000 --num_kv_heads=8

Reads T5X legacy (msgpack + tensorstore) or Orbax checkpoints from any path tensorstore/epath
can open, and HuggingFace T5 directories (config.json + safetensors or PyTorch weights); writes
an Orbax checkpoint in T5X's layout (state/ = target/... + state/step, and the source's optimizer
slots, state/param_states/..., of every parameter left unchanged) plus gqa_conversion.json, and
for a HuggingFace input the model gin that matches it. Streams the tensors, holding at most the
largest one's bytes at a time, or one stored chunk of a tensor T5X wrote in chunks. Exit status 2, with a one-line reason and nothing written, for
any input or request that cannot be converted.
"""
import json
import os
import sys
import time
import uuid

from absl import flags
from etils import epath

from gqa_t5x import cli
from gqa_t5x import common_flags
from gqa_t5x.checkpoints import hf_format, legacy_format, orbax_format, plan, pooling
from gqa_t5x.checkpoints.base import Checkpoint, CheckpointError

RECORD_FILE = 'gqa_conversion.json'
MODEL_GIN_FILE = 'gqa_model.gin'  # written for inputs that describe their model (HuggingFace)

_INPUT = flags.DEFINE_string('input', None, 'MHA checkpoint directory (T5X checkpoint_<step>, '
                             'or a HuggingFace T5 model directory).')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory to create, e.g. .../checkpoint_<step>.')
_METHOD = flags.DEFINE_enum('method', 'mean', pooling.METHODS,
                            'How a group of kv heads becomes one: the paper uses mean; aligned '
                            'rotates the heads into line first (same function, closer heads).')
_KV_HEADS = flags.DEFINE_integer(
    'num_kv_heads', None, 'G for decoder self- and cross-attention (the paper\'s conversion).')
_PER_KIND = {kind: flags.DEFINE_integer(f'num_{kind}_kv_heads', None,
                                        f'G for {kind} attention only (overrides the above).')
             for kind in plan.KIND_NAMES}
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace --output if it exists.')
_HEAD_DIM, _SEED, _GIN = common_flags.head_dim(), common_flags.seed(), common_flags.gin()


def open_checkpoint(path: str) -> Checkpoint:
  """Reads a T5X legacy or Orbax, or a HuggingFace T5 checkpoint's metadata (no arrays yet)."""
  directory = epath.Path(path)
  if not directory.exists():
    raise CheckpointError(f'input {path} does not exist')
  if legacy_format.is_legacy(directory):
    return legacy_format.read(directory)
  if orbax_format.tree_dir(directory) is not None:
    return orbax_format.read(directory)
  if hf_format.is_hf(directory):
    return hf_format.read(directory)
  raise CheckpointError(
      f'unrecognised checkpoint format at {path}: expected a T5X checkpoint_<step> directory '
      f"holding 'checkpoint' (legacy msgpack) or 'state/_METADATA' (Orbax), or a HuggingFace "
      f"model directory holding '{hf_format.CONFIG_FILE}'")


def convert(input_path: str, output_path: str, kv_heads: dict[str, int], *,
            head_dim: int | None = None, method: str = 'mean', seed: int = 0,
            num_heads: int | None = None, overwrite: bool = False, progress=None) -> dict:
  """Converts and returns the record that is also written to output/gqa_conversion.json.

  head_dim and num_heads default to the checkpoint's config where it has one (HuggingFace),
  else head_dim is 64 (T5.1.1) and num_heads is read off the kernels.
  """
  output = epath.Path(output_path)
  _check_output(epath.Path(input_path), output, overwrite)
  checkpoint = open_checkpoint(input_path)
  model = checkpoint.model_config or {}
  head_dim = _agreed('head_dim', head_dim, model.get('head_dim')) or 64
  num_heads = _agreed('num_heads', num_heads, model.get('num_heads'))
  params, facts = plan.plan(checkpoint.params, kv_heads, head_dim=head_dim, method=method,
                            seed=seed, num_heads=num_heads,
                            progress=lambda n, size: Progress(n, size, 'fitting rotations').update)
  slots = carried_slots(checkpoint, params)
  facts['optimizer_slots'] = {
      'carried_for': len({name.rpartition('/')[0] for name in slots}),
      'fresh_for': sorted({name.rpartition('/')[0] for name in checkpoint.slots} -
                          {name.rpartition('/')[0] for name in slots})}
  record = {'source': checkpoint.path, 'source_format': checkpoint.format,
            'output': os.fspath(output), 'step': int(checkpoint.step), **facts}
  if checkpoint.source_config is not None:
    record['source_config'] = checkpoint.source_config
  if model:
    record['model_gin'] = os.fspath(output / MODEL_GIN_FILE)
  progress = progress or Progress(len(params) + len(slots) + 1,
                                  sum(t.nbytes for t in (*params.values(), *slots.values())))

  def write(directory: epath.Path):
    orbax_format.write(directory, params, checkpoint.step, slots, progress.update)
    (directory / RECORD_FILE).write_text(json.dumps(record, indent=2) + '\n')
    if model:
      after = {kind: facts['attention'][kind]['kv_heads_after'] for kind in plan.KIND_NAMES}
      (directory / MODEL_GIN_FILE).write_text(model_gin(model, after, checkpoint.path))
  _write_atomically(output, overwrite, write)
  return record


def carried_slots(checkpoint: Checkpoint, converted: dict) -> dict:
  """The source's optimizer slots of every parameter the conversion leaves as it is.

  Pooled key/value kernels (and, for --method=aligned, the rotated query and out kernels) are
  new tensors: their slots are dropped, so a run from the output starts them fresh, while every
  other parameter keeps the statistics it was trained with (T5X's fine-tuning restores them).
  """
  return {name: slot for name, slot in checkpoint.slots.items()
          if converted[name.rpartition('/')[0]] is checkpoint.params[name.rpartition('/')[0]]}


def _agreed(name: str, requested: int | None, from_checkpoint: int | None) -> int | None:
  if requested is not None and from_checkpoint is not None and requested != from_checkpoint:
    raise CheckpointError(f'{name} {requested} (--{name} or --gin_file) contradicts the '
                          f"checkpoint's own config, which says {from_checkpoint}")
  return requested if requested is not None else from_checkpoint


def model_gin(model: dict, kv_heads: dict[str, int], source: str) -> str:
  """A model gin for a converted checkpoint: models/t5_1_1/base.gin with the model's sizes.

  Sizes and kv heads are base.gin's macros where it has them (the run gins read NUM_KV_HEADS and
  NUM_ENCODER_KV_HEADS), network.T5Config fields otherwise.
  """
  fields = {k: v for k, v in model.items() if k not in ('num_heads', 'vocab_size')}
  if kv_heads['decoder_cross'] != kv_heads['decoder_self']:
    fields['num_decoder_cross_kv_heads'] = kv_heads['decoder_cross']
  return '\n'.join([
      f'# The network of this checkpoint, as gqa-t5x-convert read it from {source}.',
      '# Use it as the model gin (--gin_file=<this file>); models/t5_1_1/base.gin is found on',
      "# gqa_t5x's default --gin_search_paths (for T5X, add gqa_t5x's gin_configs/ to them).",
      'from __gin__ import dynamic_registration',
      'from gqa_t5x import network',
      '',
      "include 'models/t5_1_1/base.gin'",
      '',
      f'NUM_HEADS = {model["num_heads"]}',
      f'VOCAB_SIZE = {model["vocab_size"]}',
      f'NUM_ENCODER_KV_HEADS = {kv_heads["encoder"]}',
      f'NUM_KV_HEADS = {kv_heads["decoder_self"]}',
      'network.T5Config:',
      *(f'  {name} = {value!r}' for name, value in fields.items()),
      ''])


def _check_output(input_dir: epath.Path, output: epath.Path, overwrite: bool) -> None:
  if output.exists() and not overwrite:
    raise CheckpointError(f'output {output} exists; pass --overwrite to replace it')
  source, target = (os.path.abspath(os.fspath(p)) if '://' not in os.fspath(p) else os.fspath(p)
                    for p in (input_dir, output))
  if target == source or target.startswith(source.rstrip('/') + '/') or (
      source.startswith(target.rstrip('/') + '/')):
    raise CheckpointError(f'output {output} must not be, contain or lie inside the input')


def _write_atomically(output: epath.Path, overwrite: bool, write) -> None:
  """Writes inside a hidden sibling directory and renames the result into place when complete.

  A crash or Ctrl-C leaves at most `.<name>.gqa-tmp-*/`, never a `checkpoint_<step>` that looks
  finished; it is removed on the way out whenever Python gets the chance.
  """
  output.parent.mkdir(parents=True, exist_ok=True)
  scratch = output.parent / f'.{output.name}.gqa-tmp-{uuid.uuid4().hex[:8]}'
  scratch.mkdir()
  try:
    write(scratch / output.name)  # Orbax keeps its own temporaries next to it: also in scratch.
    if output.exists():  # Only reached with --overwrite.
      output.rename(scratch / 'replaced')
    (scratch / output.name).rename(output)
  except BaseException as error:
    try:
      scratch.rmtree()
    except OSError as cleanup:  # the first error is the one to report
      error.add_note(f'and {scratch} could not be removed: {cleanup}')
    raise
  scratch.rmtree()


class Progress:
  """Prints tensor i/N, bytes, MB/s and ETA to stderr, at most about once a second."""

  def __init__(self, num_tensors: int, total_bytes: int, label: str = '', stream=sys.stderr):
    self._n, self._total, self._stream = num_tensors, max(total_bytes, 1), stream
    self._label = f'{label} ' if label else ''
    self._done = self._bytes = 0
    self._start = self._last = time.monotonic()

  def update(self, name: str, nbytes: int) -> None:
    self._done += 1
    self._bytes += nbytes
    now = time.monotonic()
    if now - self._last < 1 and self._done < self._n:
      return
    self._last = now
    elapsed = now - self._start
    rate = self._bytes / max(elapsed, 1e-9)
    when = (f'ETA {(self._total - self._bytes) / max(rate, 1):.0f}s' if self._done < self._n
            else f'done in {elapsed:.1f}s')
    print(f'{self._label}[{self._done}/{self._n}] {self._bytes / 1e6:.1f}/'
          f'{self._total / 1e6:.1f} MB, {rate / 1e6:.0f} MB/s, {when}  {name}',
          file=self._stream, flush=True)


def _model_config():
  """The T5Config of the --gin_file(s), or None (then only flags apply)."""
  if not _GIN.files.value:
    return None
  from gqa_t5x import gin_utils  # pylint: disable=g-import-not-at-top  (only with --gin_file)
  return gin_utils.model_config(_GIN.files.value, _GIN.bindings.value, _GIN.search_paths.value)


def _requested_kv_heads(config) -> dict[str, int]:
  """G per attention kind: gin config first, then --num_kv_heads, then per-kind flags."""
  kv_heads = {}
  if config is not None:
    kv_heads = {'encoder': config.encoder_kv_heads, 'decoder_self': config.decoder_self_kv_heads,
                'decoder_cross': config.decoder_cross_kv_heads}
  if _KV_HEADS.value is not None:
    kv_heads.update(decoder_self=_KV_HEADS.value, decoder_cross=_KV_HEADS.value)
  kv_heads.update({k: f.value for k, f in _PER_KIND.items() if f.value is not None})
  if not kv_heads:
    raise CheckpointError('no kv-head count requested: pass --num_kv_heads=G (decoder self- and '
                          'cross-attention), --num_<kind>_kv_heads, or a --gin_file')
  for kind, g in kv_heads.items():
    if g < 1:
      raise CheckpointError(f'kv heads for {kind} must be >= 1, got {g}')
  return kv_heads


def _run(argv) -> None:
  cli.no_positional_arguments(argv)
  for flag in (_INPUT, _OUTPUT):
    if not flag.value:
      raise CheckpointError(f'--{flag.name} is required')
  config = _model_config()
  head_dim = _HEAD_DIM.value or (config.head_dim if config else None)
  if config is not None and _HEAD_DIM.value and _HEAD_DIM.value != config.head_dim:
    raise CheckpointError(f'--head_dim={_HEAD_DIM.value} contradicts the gin config\'s '
                          f'head_dim {config.head_dim}')
  orbax_format.map_large_buffers()
  record = convert(_INPUT.value, _OUTPUT.value, _requested_kv_heads(config), head_dim=head_dim,
                   method=_METHOD.value, seed=_SEED.value, overwrite=_OVERWRITE.value,
                   num_heads=config.num_heads if config else None)
  print(json.dumps(record, indent=2))


def main(argv=None) -> None:
  cli.run('gqa-t5x-convert', _run, __doc__, argv)


if __name__ == '__main__':
  main()
