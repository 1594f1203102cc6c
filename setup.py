"""Installs megatron-dots and its `megatron-dots` console script."""

import pathlib
import re

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "megatron_dots/_version.py").read_text())[1]


def requirements(name):
    lines = (here / name).read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.startswith(("#", "-r"))]


setup(
    name="megatron-dots",
    version=version,
    description="dots.llm1-style Mixture-of-Experts training on Megatron-Core",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_dots", "megatron_dots.*"]),
    install_requires=requirements("requirements.txt"),
    extras_require={"test": requirements("requirements-test.txt")},
    entry_points={"console_scripts": ["megatron-dots = megatron_dots.cli:main"]},
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
