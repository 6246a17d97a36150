"""sat_dist: distributed, shard-reading loader for SwissArmyTransformer-family checkpoints."""
from setuptools import find_packages, setup

# One list of pins: the Makefile, CI and docker/Dockerfile install exactly these (a test checks).
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "numpy",
    "omegaconf",
    "safetensors",
    "deepspeed",
    "mpi4py",
    "tqdm",
]

setup(
    name="sat_dist",
    version="0.1.0",
    description="Load SAT / CogVideoX / DeepSpeed checkpoints tensor-parallel, each rank reading only its shard",
    packages=find_packages(include=["sat_dist", "sat_dist.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["sat-dist=sat_dist.cli:main"]},
)
