import os

# Triton runs on CPU only through its interpreter, and only if this is set before any
# @triton.jit is applied: set it before anything imports the kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
