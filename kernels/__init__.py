"""attenuation_triton: Triton kernels for the attenuation ops, each with a thin launcher (installed
from the kernels/ folder).

The kernels and their launchers take tensors, device tables and plain values, and import nothing
but torch and triton: the adapter to the ops facade (custom ops, plan caches, fallbacks) lives in
the Python package that uses them. Modules: ``filter_norms``, ``select_weak``,
``select_weak_global``, ``attenuate`` (model-wide kernels over a table of layers, whose prologue is
``layer_table``), ``masked_conv2d_kernels`` and their launchers ``masked_conv2d`` (the masked
convolution, with the run-time tile choice of ``tuning``), and ``runtime`` (how Triton runs them).
Importing the package itself needs no triton; importing a module of it does.
"""
