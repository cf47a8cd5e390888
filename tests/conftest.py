"""Test-wide set-up: 8 host CPU devices for mesh tests (must precede the first jax import)."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
