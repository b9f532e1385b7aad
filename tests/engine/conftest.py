import pytest
import torch

from retentivekv_vllm.fixtures import build_tiny_model


@pytest.fixture(scope="module", autouse=True)
def in_process_engine():
    """vLLM's engine in the test process, so tests can read its scheduler and block pool."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama"))


PROMPT_LENGTHS = (300, 150, 40)


@pytest.fixture(scope="module")
def prompts():
    """Seeded random-token prompts, longest first (a long one compresses at every budget)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(5, 2000, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
