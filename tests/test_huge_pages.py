"""gqa_t5x.huge_pages: the weights keep their values, and the kernel's own accounting
(/proc/self/smaps) holds at least the huge pages apply() reports."""
import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x import huge_pages

MIB = 1 << 20


def _anon_huge_bytes(address: int) -> int:
  """AnonHugePages of the mapping that holds `address`, from /proc/self/smaps."""
  inside = False
  with open('/proc/self/smaps') as f:
    for line in f:
      fields = line.split()
      if '-' in fields[0] and len(fields) >= 5:  # a mapping's header: start-end perms ...
        start, end = (int(x, 16) for x in fields[0].split('-'))
        inside = start <= address < end
      elif inside and fields[0] == 'AnonHugePages:':
        return int(fields[1]) * 1024
  raise AssertionError(f'no mapping holds {address:#x}')


def test_whole_pages_are_the_2_mib_pages_inside_the_buffer():
  assert huge_pages.whole_pages(0, 4 * MIB) == (0, 4 * MIB)
  assert huge_pages.whole_pages(1, 4 * MIB) == (2 * MIB, 4 * MIB)
  assert huge_pages.whole_pages(4096, 2 * MIB) == (2 * MIB, 2 * MIB)  # none whole: empty
  assert huge_pages.whole_pages(3 * MIB, 10) == (4 * MIB, 4 * MIB)


def test_weights_keep_their_values_and_smaps_holds_the_huge_pages_reported(thp_enabled):
  weight = jax.device_put(np.random.default_rng(0).standard_normal(3 * MIB, np.float32))
  want = np.array(weight)  # a copy: the buffer itself is what apply() moves
  moved = huge_pages.apply({'kernel': weight, 'scale': jnp.ones(3), 'step': 7})
  np.testing.assert_array_equal(np.asarray(weight), want)
  address = weight.unsafe_buffer_pointer()
  start, end = huge_pages.whole_pages(address, weight.nbytes)
  assert end - start >= 10 * MIB and moved in (0, end - start)
  if thp_enabled:
    assert moved == end - start  # this project's machines: THP `madvise`, Linux 6.1 or later
  assert _anon_huge_bytes(start) >= moved
  # Again: nothing left to move, and the same bytes are reported.
  assert huge_pages.apply(weight) == moved
