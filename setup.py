"""gqa-t5x: grouped-query attention for T5X (Ainslie et al., EMNLP 2023), in JAX/Flax.

Install with `bash tools/setup_env.sh`, not plain pip: see README.md (Installation) for why.
Pinned, tested versions of the dependencies are in tools/requirements*.txt.
"""
import setuptools

setuptools.setup(
    name="gqa_t5x",
    version="0.1.0",
    description="Grouped-query attention T5 (GQA paper reproduction) for T5X / Flax.",
    python_requires=">=3.11",
    # tasks/ ships as gqa_t5x.tasks so that `MIXTURE_OR_TASK_MODULE = "gqa_t5x.tasks"` works.
    packages=setuptools.find_packages(include=["gqa_t5x", "gqa_t5x.*"]) + ["gqa_t5x.tasks"],
    package_dir={"gqa_t5x.tasks": "tasks"},
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorstore>=0.1.86,<0.2",
        "tensorflow-cpu>=2.21,<2.22",
        "tensorflow-datasets>=4.9.10,<4.10",
        "importlib_resources>=6.0",
        "tensorboard>=2.20,<3",
        "gin-config>=0.5.0,<0.6",
        "clu>=0.0.12,<0.1",
        "sentencepiece>=0.2.3,<0.3",
        "rouge-score>=0.1.2,<0.2",
        "sacrebleu>=2.6,<3",
        "absl-py>=2.1",
        "msgpack>=1.0",
        "safetensors>=0.8,<0.9",  # HuggingFace checkpoints for gqa-t5x-convert
        "etils[epath]",
        "matplotlib>=3.8,<4",
        # Also needed, installed --no-deps by tools/setup_env.sh: seqio==0.0.20,
        # tensorflow-text==2.21.1 (both would otherwise pull in the full `tensorflow`).
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
