r"""Trains (or resumes) a model, T5X-style.

  gqa-t5x-train --gin_file=models/t5_1_1/small.gin --gin_file=runs/pretrain.gin \
      --gin.MODEL_DIR=\"/tmp/run\" ...
"""
from gqa_t5x import gin_utils

main = gin_utils.command('gqa-t5x-train', 'train', __doc__)

if __name__ == '__main__':
  main()
