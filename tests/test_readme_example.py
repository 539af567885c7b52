"""The README's drop-in example, run on a torchvision ResNet-18 with random data."""
import torch
import torch.nn.functional as F

import attenuation
from attenuation import Pruner, method_config


def test_readme_example_on_resnet18(tmp_path):
    torchvision = __import__("pytest").importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    pruner = Pruner(model, method_config("attenuation", criterion="l1", ratio=0.5, interval=2))
    assert all(isinstance(layer.conv, attenuation.AttenuatedConv2d) for layer in pruner.layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(4)]
    pruner.start(total_steps=len(loader))
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()
    pruner.finish()
    assert abs(pruner.live_fraction() - 0.5) < 0.01
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    torch.save(pruner.state_dict(), tmp_path / "pruner.pt")
    state = torch.load(tmp_path / "pruner.pt", weights_only=True)
    assert state["counts"] == pruner.counts
