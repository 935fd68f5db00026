from pipepack.testing import run_ranks  # noqa: F401
