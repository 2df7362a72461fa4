import os

import pytest
import torch

# CI machines have 2 cores; more threads than that only adds contention for tiny test models.
torch.set_num_threads(int(os.environ.get("GRADMEM_TEST_THREADS", "2")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
