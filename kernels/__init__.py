"""Triton kernels for the hot ops; ``kernels.reference`` holds the plain-torch definitions of correct."""
