#!/usr/bin/env python
"""afigan: AF interpolator (AFI-GAN) and feature-enhanced backbones as a Detectron2 extension.

Detectron2 is a prerequisite installed from source (it is not on the package index), so it is
not listed in install_requires; ``import afigan`` works without it, and only the
Detectron2-facing modules need it.
"""

import os
import re

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "afigan", "__init__.py")) as f:
    version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="afigan",
    version=version,
    description="AF interpolator (AFI-GAN) feature pyramids and feature-enhanced backbones for Detectron2",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.8",
    packages=find_packages(include=["afigan", "afigan.*"]),
    install_requires=[
        "torch",
        "torchvision",
        "fvcore",
        "pycocotools",
        "timm",
        "numpy",
        "Pillow",
        # Detectron2 lists both too; afigan uses them itself: the demo's drawings (Detectron2's
        # Visualizer) and the metrics plot need matplotlib, the demo's progress bar tqdm.
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest"],
        "plot": ["matplotlib"],  # kept for existing install commands; matplotlib is now required
        # tools/export_model.py --format onnx: onnxruntime runs the exported file for the check, the tests read it
        # with onnx.
        "onnx": ["onnx", "onnxruntime"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
