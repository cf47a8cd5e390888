"""gqa-t5x: grouped-query attention for T5X (Ainslie et al., EMNLP 2023), in JAX/Flax.

`pip install .` (or a wheel built with `pip wheel .`) gives a working environment; for
development, `bash tools/setup_env.sh` installs the pinned, tested versions
(tools/requirements.txt) and this checkout in editable mode.
"""
import setuptools

setuptools.setup(
    name="gqa_t5x",
    version="0.1.0",
    description="Grouped-query attention T5 (GQA paper reproduction) for T5X / Flax.",
    python_requires=">=3.11",
    # The top-level tasks/ ships as gqa_t5x.tasks (so `MIXTURE_OR_TASK_MODULE = "gqa_t5x.tasks"`
    # works) and gin_configs/ as gqa_t5x/gin_configs/, where gqa_t5x.GIN_CONFIGS_DIR finds it.
    packages=(setuptools.find_packages(include=["gqa_t5x", "gqa_t5x.*"])
              + ["gqa_t5x.tasks", "gqa_t5x.gin_configs"]),
    package_dir={"gqa_t5x.tasks": "tasks", "gqa_t5x.gin_configs": "gin_configs"},
    # The CPU decode kernel ships as source: it is compiled on first use, for the CPU it runs on.
    package_data={"gqa_t5x.gin_configs": ["**/*.gin"], "gqa_t5x.cpu_kernels": ["*.cc"]},
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorstore>=0.1.86,<0.2",
        # The full `tensorflow`, not tensorflow-cpu: tensorflow-text (and seqio through it)
        # requires it, and pip would write it over tensorflow-cpu's files. Colab has it already.
        "tensorflow>=2.21,<2.22",
        "tensorflow-text>=2.21.1,<2.22",
        "seqio==0.0.20",
        "tensorflow-datasets>=4.9.10,<4.10",
        "importlib_resources>=6.0",  # imported by tensorflow-datasets, which does not declare it
        "tensorboard>=2.20,<3",  # clu's metric writers need it; TensorFlow 2.21 no longer brings it
        "gin-config>=0.5.0,<0.6",
        "clu>=0.0.12,<0.1",
        "sentencepiece>=0.2.3,<0.3",
        "rouge-score>=0.1.2,<0.2",
        "sacrebleu>=2.6,<3",
        "absl-py>=2.1",
        "etils[epath]",
        "msgpack>=1.0",
        "numpy>=1.26,<3",
        "safetensors>=0.8,<0.9",  # HuggingFace checkpoints for gqa-t5x-convert
        "matplotlib>=3.8,<4",
        "scipy>=1.11",  # the reproduction's confidence intervals
    ],
    extras_require={
        # The decode benchmark's peer (HuggingFace T5 on PyTorch). torch 2.13.0's CPU build is
        # what was tested; a looser pin lets pip pick a multi-GB CUDA build.
        "peer": ["torch==2.13.0", "transformers>=5.17,<6"],
    },
    entry_points={
        "console_scripts": [
            "gqa-t5x-demo = gqa_t5x.demo:main",
            "gqa-t5x-convert = gqa_t5x.convert:main",
            "gqa-t5x-benchmark = gqa_t5x.benchmark.cli:main",
            "gqa-t5x-train = gqa_t5x.train:main",
            "gqa-t5x-eval = gqa_t5x.eval:main",
            "gqa-t5x-infer = gqa_t5x.infer:main",
            "gqa-t5x-reproduce = gqa_t5x.reproduce.cli:main",
        ],
    },
)
