"""`python -m gqa_t5x.eval --gin_file=models/t5_1_1/small.gin --gin_file=runs/eval.gin
--gin.CHECKPOINT_PATH=\"/tmp/run\" ...`: scores checkpoints on a task's metrics."""
from gqa_t5x import gin_utils, runs

main = gin_utils.run(runs.evaluate)

if __name__ == '__main__':
  main()
