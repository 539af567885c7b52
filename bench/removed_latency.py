"""The physically removed network against the unpruned one: inference latency at batch 1 and at
a large batch, for 25/50/75% of filters removed (one-shot by L1 norm), with each layer's kept
count as it falls and rounded up to a multiple of 8 (the channel multiple that oneDNN and tensor
cores favour), set against the MACs ratio that the removal promises."""
from __future__ import annotations

import torch

from attenuation.channels_last import as_channels_last
from attenuation.profiling import count_macs, count_parameters
from attenuation.surgery import remove_filters

from . import section
from .timing import interleaved
from .workload import Settings, cifar_batch, inference, keep_masks, vgg_model

ROUNDINGS = (1, 8)


def _networks(settings: Settings, device: torch.device) -> dict:
    """name -> network: "unpruned" and "<ratio>/round<k>" for each ratio and rounding."""
    base = vgg_model(settings, device)
    networks = {"unpruned": base}
    for ratio in settings.ratios:
        keep = keep_masks(base, ratio)
        for round_to in ROUNDINGS:
            removed = remove_filters(base, keep, round_to=round_to)
            networks[f"{ratio:g}/round{round_to}"] = as_channels_last(removed)
    return networks


def measure(device: torch.device, settings: Settings) -> dict:
    """Latency of the removed network against the unpruned one and against its MACs ratio."""
    networks = _networks(settings, device)
    latency = {}
    for batch in settings.latency_batches:
        x, _ = cifar_batch(batch, device)
        times = interleaved({name: inference(net, x) for name, net in networks.items()}, device,
                            settings.warmup, settings.repeats)
        latency[batch] = {name: t["median_ms"] for name, t in times.items()}
    unpruned_macs = count_macs(networks["unpruned"])
    rows = []
    for name, net in networks.items():
        if name == "unpruned":
            continue
        ratio, round_to = name.split("/round")
        macs = count_macs(net)
        rows.append({
            "ratio": float(ratio), "round_to": int(round_to), "params": count_parameters(net),
            "macs": macs, "macs_ratio": macs / unpruned_macs,
            "latency_ms": {str(b): latency[b][name] for b in settings.latency_batches},
            "speedup": {str(b): latency[b]["unpruned"] / latency[b][name]
                        for b in settings.latency_batches}})
    return {"model": settings.model_name,
            "unpruned": {"params": count_parameters(networks["unpruned"]), "macs": unpruned_macs,
                         "latency_ms": {str(b): latency[b]["unpruned"] for b in settings.latency_batches}},
            "rows": rows}


if __name__ == "__main__":
    section.main("removed_latency", measure)
