r"""Writes a checkpoint's predictions as JSON lines.

  gqa-t5x-infer --gin_file=models/t5_1_1/small.gin --gin_file=runs/infer.gin \
      --gin.CHECKPOINT_PATH=\"/tmp/run/checkpoint_1000\" ...
"""
from gqa_t5x import gin_utils

main = gin_utils.command('gqa-t5x-infer', 'infer', __doc__)

if __name__ == '__main__':
  main()
