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

VIS = ["opencv-python-headless"]

setup(
    name="afigan",
    version=version,
    description="AF interpolator (AFI-GAN) feature pyramids and feature-enhanced backbones for Detectron2",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.8",
    packages=find_packages(include=["afigan", "afigan.*"]),
    # Every top-level module that afigan/, tools/ and configs/ import themselves (tests/test_dependencies.py
    # checks it): a dependency that only arrives through Detectron2 today (PyYAML, omegaconf) can be gone tomorrow.
    install_requires=[
        "torch",
        "torchvision",
        "fvcore",
        "pycocotools",
        "timm",
        "numpy",
        "Pillow",
        "PyYAML",  # afigan/config.py, afigan/benchmark/study/
        "omegaconf",  # the LazyConfig files under configs/
        # Detectron2 lists both too; afigan uses them itself: the feature figures and the metrics plot
        # need matplotlib, the demo's progress bar tqdm.
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        # Drawing with Detectron2's Visualizer (tools/demo.py's images) needs OpenCV, which Detectron2 does not
        # declare. afigan imports the Visualizer only inside the function that draws, so training, the pipeline
        # and evaluation never need it. The headless build: afigan never opens a window, it carries no Qt/X11
        # libraries (servers, containers, CI), and it is the one a machine without a display can load.
        # opencv-python and opencv-python-headless install the same `cv2` and clash when both are present: where
        # opencv-python (or -contrib) is already installed it serves as well, so leave this extra out there.
        "vis": VIS,
        # What the README's install command and .ci/run install: the test runner, the ONNX export checks (onnx
        # reads the exported file, onnxruntime runs it), the linter and formatter .ci/run runs, and OpenCV for
        # the tests that draw (so `.[test]` alone runs the whole suite).
        "test": ["pytest", "onnx", "onnxruntime", "ruff"] + VIS,
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
