"""musicrl_jax: MusicRL (RL from human feedback for text-to-music) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="musicrl_jax",
    version="0.1.0",
    description="Fine-tune an autoregressive text-to-music model with RLHF (MusicRL) in JAX/Flax.",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["musicrl_jax", "musicrl_jax.*"]),
    include_package_data=True,
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "clu==0.0.12",
        "chex==0.1.92",
        "gin-config==0.5.0",
        "seqio==0.0.20",
        "tensorflow-cpu==2.21.0",
        "tensorflow-text==2.21.1",
        "tensorflow-datasets==4.9.10",
        "tensorboard==2.21.0",
        "sentencepiece==0.2.3",
        "soundfile==0.14.0",
        "librosa==0.11.0",
        "music21==10.5.1",
        "numpy==2.4.6",
        "safetensors==0.8.0",  # model-hub checkpoints (musicrl_jax.hub), read without torch
        "absl-py==2.5.1",
        "tqdm==4.70.1",
        "threadpoolctl==3.8.0",
        # The listening web page (musicrl_jax/listening) and its browser/load tests.
        "fastapi==0.165.0",
        "uvicorn==0.54.0",
        "python-multipart==0.0.34",
        "httpx==0.28.1",
    ],
    extras_require={
        "test": ["pytest==9.2.0", "selenium==4.51.0"],
        # Benchmark comparisons and the converters' equality tests (kept out of the main install;
        # requirements-test.lock pins them with their dependencies and `make test` installs it).
        "bench": ["torch==2.13.0", "transformers==5.23.0", "trl==1.16.0"],
    },
)
