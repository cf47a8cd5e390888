"""Decode-speed benchmark: time per sample across kv-head counts G against the memory roofline.

Imports only jax/flax/numpy/absl/matplotlib (torch and transformers lazily, for the peer), so it
runs on a machine that has no TensorFlow/SeqIO/gin.
"""
