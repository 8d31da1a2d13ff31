"""Whether the application's deployments fit the Ray cluster: what they ask for against what it has.

Serve places what fits and leaves the other replicas pending without an error (its controller
logs a warning later, among replica logs), so `adpa serve --ray` checks first and says so in one
line. Totals only: a cluster whose CPUs are spread over nodes may still not place a large replica.
"""

from __future__ import annotations

from dataclasses import dataclass

from adpa.services.config import ServeConfig


@dataclass(frozen=True)
class Ask:
    """One deployment's replicas and what each reserves."""

    name: str
    replicas: int
    cpus: float
    gpus: float


def app_asks(config: ServeConfig, most: bool = False) -> list[Ask]:
    """The deployments `build_app` creates from `config` (no reference deployment when the reference
    is remote or loaded in every teacher replica). With `ray_autoscale`, `most=False` counts the
    teacher replicas it starts with (MIN), `most=True` those it may grow to (MAX)."""
    cpus, gpus = config.ray_cpus_per_replica, config.ray_gpus_per_replica
    low, high = config.ray_autoscale_range
    asks = [Ask("teacher", high if most else low, cpus, gpus)]
    if not (config.remote_reference or config.ray_colocate_reference):
        asks.append(Ask("reference", config.ray_reference_replicas, cpus, gpus))
    return asks


def local_resources() -> dict[str, float]:
    """What a local Ray started here will have, known before starting it: Ray's own CPU count
    (cgroup limits included) and the GPUs visible to this process."""
    import torch
    from ray._private.utils import get_num_cpus

    return {"CPU": float(get_num_cpus()), "GPU": float(torch.cuda.device_count())}


def shortfall(asks: list[Ask], resources: dict[str, float]) -> str | None:
    """None when every replica fits the cluster's totals (`ray.cluster_resources()`); else one line
    naming the numbers."""
    cpus = sum(a.replicas * a.cpus for a in asks)
    gpus = sum(a.replicas * a.gpus for a in asks)
    have_cpus, have_gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if cpus <= have_cpus and gpus <= have_gpus:
        return None
    parts = ", ".join(f"{a.name} {a.replicas} x ({a.cpus:g} CPU, {a.gpus:g} GPU)" for a in asks)
    return (f"the deployments ask for {cpus:g} CPUs and {gpus:g} GPUs ({parts}) but the Ray cluster has "
            f"{have_cpus:g} CPUs and {have_gpus:g} GPUs: some replicas cannot be placed; lower --ray-replicas, "
            "--ray-reference-replicas or --ray-cpus-per-replica / --ray-gpus-per-replica")
