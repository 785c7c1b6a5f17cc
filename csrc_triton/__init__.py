"""Triton kernels of adaptive_moe and their launchers.

``scatter_gemm``  grouped GEMMs that gather / scatter expert rows inside the kernel
``elementwise``   the MLP activation (GLU or plain) and the gated combine of expert outputs

Importing this package does not import Triton; the kernel modules do. Launchers validate
their arguments (``ValueError`` naming the argument) and allocate outputs; autograd lives in
``adaptive_moe.runtime.experts.kernels``.
"""
