"""`python -m gqa_t5x.train --gin_file=models/t5_1_1/small.gin --gin_file=runs/pretrain.gin
--gin.MODEL_DIR=\"/tmp/run\" ...`: trains (or resumes) a model, T5X-style."""
from gqa_t5x import gin_utils, runs

main = gin_utils.run(runs.train)

if __name__ == '__main__':
  main()
