"""fcot: the FCoT-VL method on top of fcot_kernels (compressors, model integration, training
loops, CLI). It uses only the public ``fcot_kernels`` API."""

__version__ = "0.1.0"
