"""Test helpers for pipepack and its users: bit-exact dict comparison, a local rank launcher,
and the engines' own per-tensor transport (``baselines``) to measure against.

``check_dict`` / ``check_tensor`` / ``check_plain`` compare received tensor dicts exactly (NaN
payloads and -0.0 included); ``random_bytes`` makes a tensor of random bytes; ``run_ranks`` runs
a function on N fork-started gloo ranks with a timeout and re-raises any rank's traceback.
"""

from .compare import check_dict, check_plain, check_tensor, random_bytes, raw_bytes
from .ranks import run_ranks

__all__ = ["check_dict", "check_plain", "check_tensor", "random_bytes", "raw_bytes", "run_ranks"]
