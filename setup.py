"""Which packages the distribution holds (everything else is in pyproject.toml).

Discovered, never listed by hand: every package under gim_fast/, and kernels/ (with any subpackage) installed as
``gim_fast.kernels``. kernels/ lives at the top of the repository, but a top-level module named ``kernels`` must
never be installed: it would shadow Hugging Face's own ``kernels`` package, which transformers imports.
pyproject.toml's declarative ``packages.find`` cannot rename a package, hence this file.
"""
from setuptools import find_packages, setup

KERNELS = "gim_fast.kernels"   # what kernels/ is installed as

packages = find_packages(include=["gim_fast", "gim_fast.*"])
packages += [KERNELS + name[len("kernels"):] for name in find_packages(include=["kernels", "kernels.*"])]

setup(packages=packages, package_dir={"gim_fast": "gim_fast", KERNELS: "kernels"})
