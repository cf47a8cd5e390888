"""Logical axis names of gqa_t5x's parameters and activations, and their mesh rules.

T5X places every array by logical names (batch, heads, ...) mapped onto a ('data', 'model') mesh.
GQA adds one idea: the key/value head axis gets its own names, so that a kv dimension that does
not divide the model axis (MQA, small G) can stay replicated while query heads are sharded.
"""
from typing import Iterable, Sequence

BATCH = 'batch'
LENGTH = 'length'
EMBED = 'embed'
MLP = 'mlp'
VOCAB = 'vocab'
HEADS = 'heads'  # query heads (H)
KV_HEADS = 'kv_heads'  # key/value heads (G)
KV = 'kv'  # head_dim
JOINED_KV = 'joined_kv'  # H * head_dim: query kernel columns, out kernel rows
JOINED_KV_HEADS = 'joined_kv_heads'  # G * head_dim: key/value kernel columns
RELPOS_BUCKETS = 'relpos_buckets'

DATA_AXIS = 'data'
MODEL_AXIS = 'model'

# T5X's standard_logical_axis_rules (partitioning.py), for the names this package uses.
STANDARD_RULES = (
    (BATCH, DATA_AXIS),
    (VOCAB, MODEL_AXIS),
    (MLP, MODEL_AXIS),
    (HEADS, MODEL_AXIS),
    (JOINED_KV, MODEL_AXIS),
    (KV, None),
    (EMBED, None),
    (LENGTH, None),
    (RELPOS_BUCKETS, None),
)


def kv_heads_shardable(kv_head_counts: Iterable[int], num_partitions: int) -> bool:
  """Whether every attention's kv heads split evenly over `num_partitions` model shards."""
  return all(g % num_partitions == 0 for g in kv_head_counts)


def logical_axis_rules(num_partitions: int,
                       kv_head_counts: Iterable[int]) -> Sequence[tuple[str, str | None]]:
  """T5X's standard rules plus the kv-head names, sharded only where every G divides the axis."""
  kv_axis = MODEL_AXIS if kv_heads_shardable(kv_head_counts, num_partitions) else None
  return STANDARD_RULES + ((KV_HEADS, kv_axis), (JOINED_KV_HEADS, kv_axis))
