"""Triton kernels of sae_fast, installed as ``sae_fast.triton_kernels`` (never as a top-level
``triton_kernels``, which is OpenAI's package name). Each module holds ``@triton.jit`` kernels
and host launchers that validate nothing beyond what they need, allocate outputs and launch.

Import these modules lazily: ``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates."""
