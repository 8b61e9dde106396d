"""rlhi: Reinforcement Learning from Human Interaction, in JAX/Flax."""

import setuptools

setuptools.setup(
    name="rlhi",
    version="0.1.0",
    description=(
        "Train chat models from real user conversations (RLHI): personas, "
        "user-guided rewrites, persona-conditioned reward models and DPO."),
    python_requires=">=3.10",
    packages=setuptools.find_packages(
        include=["rlhi", "rlhi.*", "configs", "experiments"]),
    package_data={
        "rlhi.data": ["prompts/*.txt", "samples/*.jsonl", "samples/*.md",
                      "samples/source/*.json"],
        "rlhi.eval": ["prompts/*.txt"],
    },
    install_requires=[
        "absl-py",
        "aiohttp",
        "datasets",
        "flax",
        "grain",
        "httpx",
        "jax",
        "jinja2",
        "matplotlib",
        "ml-collections",
        "numpy",
        "optax",
        "orbax-checkpoint",
        "safetensors",
        "tensorboardX",
        "tensorflow-datasets",
        "tokenizers",
        "tqdm",
        "transformers",
    ],
    extras_require={
        # torch is only a reference for parity tests and benchmarks (HF in torch).
        "test": ["ipykernel", "nbclient", "nbformat", "pytest", "torch==2.13.0"],
        "bench": ["torch==2.13.0", "trl"],
        "tpu": ["jax[tpu]", "gcsfs"],
    },
)
