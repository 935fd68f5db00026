from pipepack.testing import check_dict, check_plain, check_tensor, raw_bytes  # noqa: F401
