"""sat_dist: distributed, shard-reading loader for SwissArmyTransformer-family checkpoints."""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _requirements(name: str) -> list[str]:
    """Pins live in one file that setup.py, the Makefile and docker/Dockerfile all read."""
    with open(os.path.join(HERE, name)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


INSTALL_REQUIRES = _requirements("requirements.txt")

setup(
    name="sat_dist",
    version="0.1.0",
    description="Load SAT / CogVideoX / DeepSpeed checkpoints tensor-parallel, each rank reading only its shard",
    packages=find_packages(include=["sat_dist", "sat_dist.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": _requirements("requirements-test.txt")},
    entry_points={"console_scripts": ["sat-dist=sat_dist.cli:main"]},
)
