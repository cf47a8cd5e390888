"""`python -m gqa_t5x.infer --gin_file=models/t5_1_1/small.gin --gin_file=runs/infer.gin
--gin.CHECKPOINT_PATH=\"/tmp/run/checkpoint_1000\" ...`: writes predictions as JSON lines."""
from gqa_t5x import gin_utils, runs

main = gin_utils.run(runs.infer)

if __name__ == '__main__':
  main()
