"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere.

Tests that read ../shared (the reference fixtures beside the checkout) skip themselves, with
the reason, when it is absent.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
