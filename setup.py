"""Packages of the one import package ``samenet`` (pyproject.toml maps its folders)."""
from setuptools import find_packages, setup

setup(packages=["samenet", "samenet.backends", *(f"samenet.backends.{p}" for p in find_packages("backends"))])
