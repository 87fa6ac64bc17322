from lvllm_cli.compat import SUPPORTED_VLLM_MAX_EXCLUSIVE, SUPPORTED_VLLM_MIN, supported_range_text, vllm_supported


def test_supported_range():
    assert SUPPORTED_VLLM_MIN == "0.26" and SUPPORTED_VLLM_MAX_EXCLUSIVE == "0.34"
    for v in ("0.26", "0.26.0", "0.26.1+cu128", "0.26.0rc1", "0.30.2", "0.33.9", "0.33.0.dev12+gabc"):
        assert vllm_supported(v), v
    for v in ("0.25.9", "0.34.0", "0.34.0rc1", "0.3", "1.0", "", "garbage", "0.9.2"):
        assert not vllm_supported(v), v
    assert supported_range_text() == ">=0.26,<0.34"
