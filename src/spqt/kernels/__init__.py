"""Kernels: Triton GPU kernels (one file per family), their torch twins (reference.py), the
dispatcher and the tuner. Only this package imports Triton, lazily, so `import spqt` works
without a GPU or Triton."""
