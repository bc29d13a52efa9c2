import os

# Nothing in the test suite may reach the network: weights, tokenizers and data are all made locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and the suite runs in parallel workers (pytest -n 2)
# on small machines, where two threads per worker oversubscribe the cores and slow every test down.
torch.set_num_threads(1)


@pytest.fixture
def tiny_components():
    """Seeded tiny random components: vae, unet, text_encoder, tokenizer, scheduler (DDIM)."""
    from latentdiff.testing import tiny_components as build

    return build(seed=0)


def pytest_report_header(config):
    """Which torch the suite runs on (LATENTDIFF_TORCH=lowest runs it on the lowest accepted)."""
    return f"torch {torch.__version__}"
