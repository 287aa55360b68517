"""Which packages the distribution holds (everything else is in pyproject.toml).

Discovered, never listed by hand: every package under gim_fast/, including ``gim_fast.kernels``.

The Triton kernels live in the repository's top-level ``kernels/`` folder, which has no ``__init__.py``, and
``gim_fast/kernels`` is a symbolic link to it. Why: a Python started in the repository root (``python -m pytest``,
``python -c``, a notebook) puts the root first on ``sys.path``, and a regular package there named ``kernels`` would
hide Hugging Face's own ``kernels`` package, which transformers imports. A folder without ``__init__.py`` is at most
a namespace portion, which never wins over a regular package anywhere on the path. Inside gim_fast the link makes
``gim_fast.kernels`` an ordinary (namespace) subpackage found on ``gim_fast.__path__`` — in a source checkout, in an
editable install (whose finder cannot map a namespace subpackage to another folder) and in the wheel, where the
build copies the link's files.
"""
from setuptools import find_namespace_packages, setup

setup(packages=find_namespace_packages(include=["gim_fast", "gim_fast.*"], exclude=["*__pycache__"]))
