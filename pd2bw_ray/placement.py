"""Where stage replicas run: the cluster's resources checked against the pipeline's, one
placement group in pipeline order, and each stage actor's Ray options.

Bundles are in pipeline order (replica-major): with PACK the stages of one pipeline share a node
(activations stay local) and replicas spread over nodes (only the gradient all-reduce crosses
them), as PipeDream places them.
"""

from __future__ import annotations

from typing import Any

from .config import ActorResources, ConfigError

PLACEMENT_TIMEOUT_S = 120.0


def check_resources(resources: ActorResources, world: int) -> None:
    """Raise ConfigError if the Ray cluster lacks the CPUs or GPUs of ``world`` replicas."""
    import ray

    have = ray.cluster_resources()
    for key, per in (("GPU", resources.num_gpus), ("CPU", resources.num_cpus)):
        need = per * world
        if need > have.get(key, 0) + 1e-9:
            hint = ("use fewer replicas or stages, or a cluster with more GPUs"
                    if key == "GPU" else
                    f"lower ActorResources(num_cpus=...) (e.g. "
                    f"{max(have.get('CPU', 0) / world, 0):.2g}) or add nodes")
            raise ConfigError(
                f"the pipeline asks for {need:g} {key}s ({world} stage replicas x {per:g}) "
                f"but the Ray cluster has {have.get(key, 0):g}; {hint}")


def stage_placement_group(name: str, resources: ActorResources, world: int) -> Any:
    """A ready placement group of one bundle per stage replica (None when the replicas ask for
    no resources)."""
    import ray

    if not (resources.num_cpus > 0 or resources.num_gpus > 0):
        return None
    bundle = {k: v for k, v in (("CPU", resources.num_cpus), ("GPU", resources.num_gpus))
              if v > 0}
    pg = ray.util.placement_group([dict(bundle) for _ in range(world)],
                                  strategy=resources.placement_strategy, name=f"{name}-stages")
    try:
        ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise ConfigError(
            f"Ray could not place {world} stage replicas with {bundle} each "
            f"({resources.placement_strategy}) within {PLACEMENT_TIMEOUT_S:.0f} s; the cluster "
            f"has {ray.cluster_resources()}") from None
    return pg


def actor_options(name: str, stage: int, replica: int, num_stages: int,
                  resources: ActorResources, placement_group: Any) -> dict[str, Any]:
    """The Ray options of stage replica (stage, replica): its resources, its name
    ``<run>:stage<s>:replica<r>``, no restarts, and its bundle of the placement group."""
    opts: dict[str, Any] = dict(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                                name=f"{name}:stage{stage}:replica{replica}", max_restarts=0)
    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement_group,
            placement_group_bundle_index=replica * num_stages + stage)
    return opts
