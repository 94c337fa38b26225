"""Triton kernels and their launchers (one file per op). Imported lazily by the ops, so that
``TRITON_INTERPRET`` can be set before triton is first imported."""
