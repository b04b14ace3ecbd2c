"""Package discovery, which pyproject.toml cannot say alone: every folder under minigpt/ (data folders
such as a server's static/ included, hence namespace discovery) plus minigpt.configs, whose files
live in configs/ at the top of the checkout (see [tool.setuptools] package-dir in pyproject.toml)."""

from setuptools import find_namespace_packages, setup

packages = find_namespace_packages(include=["minigpt", "minigpt.*"], exclude=["*.__pycache__"])
setup(packages=[*packages, "minigpt.configs"])
