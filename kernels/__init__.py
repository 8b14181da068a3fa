"""Triton kernels of dnd_scale (installed as ``dnd_kernels``; the folder is ``kernels/``)."""
