"""Package discovery: every folder of dsd_fx/ and of passes/ (shipped as dsd_fx.passes), found, never listed."""
from setuptools import find_packages, setup

# pyproject.toml holds the metadata; only the passes/ -> dsd_fx.passes mapping needs code, since
# setuptools' declarative find cannot rename a found folder
PASSES = ["dsd_fx.passes"] + [f"dsd_fx.passes.{p}" for p in find_packages("passes")]
setup(packages=find_packages(include=["dsd_fx", "dsd_fx.*"]) + PASSES, package_dir={"dsd_fx.passes": "passes"})
