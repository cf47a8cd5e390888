r"""Scores checkpoints on a task's metrics.

  gqa-t5x-eval --gin_file=models/t5_1_1/small.gin --gin_file=runs/eval.gin \
      --gin.CHECKPOINT_PATH=\"/tmp/run\" ...
"""
from gqa_t5x import gin_utils

main = gin_utils.command('gqa-t5x-eval', 'evaluate', __doc__)

if __name__ == '__main__':
  main()
