"""attenuation_triton: Triton kernels for the ``attenuation`` ops (installed from the kernels/ folder).

``backend`` is the backend object (the module :mod:`attenuation_triton.backend`) registered as
``"triton"`` by :mod:`attenuation.ops.backends`, or None when triton cannot be imported. Importing
this package never fails for lack of triton.
"""
try:
    import triton  # noqa: F401
except Exception as error:  # not installed, or a broken install: no triton backend
    backend = None
    IMPORT_ERROR: "Exception | None" = error
else:
    from . import backend
    IMPORT_ERROR = None

__all__ = ["backend", "IMPORT_ERROR"]
