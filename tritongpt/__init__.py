"""tritongpt: a GPT-2-family model where every hot op has a reference module and a Triton kernel.

Importing this package makes the Triton path usable on a machine without a GPU: Triton
kernels can only run on CPU tensors through Triton's interpreter, and the interpreter is
switched on by the environment variable TRITON_INTERPRET=1, which Triton reads once, when it
is first imported. So we set it here, before anything imports triton, unless the user chose.
It also keeps the checkout's kernels/ folder from shadowing the PyPI package `kernels` (see
_env.unshadow_pypi_kernels).
"""
from tritongpt._env import setup_triton_env, unshadow_pypi_kernels

setup_triton_env()
unshadow_pypi_kernels()

__version__ = "0.1.0"
