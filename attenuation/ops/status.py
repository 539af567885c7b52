"""The per-filter status codes, the Python home of the one definition.

The pruner keeps one uint8 code per filter. The C++ extension has its own copy of these values
(``kActive``, ``kWeak``, ``kRemoved`` in csrc/include/attenuation/filter_rule.h); the Triton
kernels receive them as launch arguments. tests/test_status.py checks that they agree.
"""

ACTIVE = 0    # a filter the rule leaves alone (multiplier 1)
WEAK = 1      # attenuated at the last attenuation step (multiplier a^k)
REMOVED = 2   # zeroed for good, its gradients masked

__all__ = ["ACTIVE", "WEAK", "REMOVED"]
