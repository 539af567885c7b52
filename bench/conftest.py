import pytest
import torch

# The attenuation-step benchmarks scale the same weights thousands of times: without flushing,
# they would sink into denormal numbers, which the CPU computes many times slower (attenuation
# run flushes them too, for the same reason).
torch.set_flush_denormal(True)


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return torch.device(request.param)
