"""Random weights and a pre-filled decode cache, made without running the model.

Why: timing needs realistic shapes and finite values, not trained weights, and initialising an
XXL-width model by running it (model.init) would cost the benchmark minutes of encoder compute.
Shapes come from jax.eval_shape (free); values are drawn directly on the device.
"""
import jax
import jax.numpy as jnp

CACHE_INDEX = 'cache_index'


def random_tree(shapes, seed: int, dtype):
  """N(0, 1/fan_in) for matrices (fan_in = first axis), ones for vectors (norm scales)."""
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))

  def draw(key, leaf):
    if len(leaf.shape) < 2:
      return jnp.ones(leaf.shape, dtype)
    return (jax.random.normal(key, leaf.shape, jnp.float32) * leaf.shape[0] ** -0.5).astype(dtype)

  return jax.tree.unflatten(treedef, [draw(k, leaf) for k, leaf in zip(keys, leaves)])


def filled_cache(shapes, seed: int, dtype, index: int):
  """Cache leaves: N(0, 1) keys/values in `dtype`, every `cache_index` set to `index`."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))

  def fill(key, path, leaf):
    if path[-1].key == CACHE_INDEX:
      return jnp.array(index, leaf.dtype)
    return jax.random.normal(key, leaf.shape, jnp.float32).astype(dtype)

  return jax.tree.unflatten(treedef, [fill(k, p, leaf) for k, (p, leaf) in zip(keys, leaves)])


def peak_bytes(compiled) -> int | None:
  """XLA's own estimate of a compiled call's peak memory: arguments + outputs + temporaries."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
          - stats.alias_size_in_bytes)
