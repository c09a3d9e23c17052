"""Where the sweep's coordinators run: the tasks that drive a dataset x method search (Tune's
controller, its searcher and callbacks) and the trials that only drive a Ray Train run.

They use no GPU and little CPU, but losing one ends its search (or its Train run) while GPU and
spot nodes come and go. So they go to nodes that declare the sweep's coordinator resource
(``cluster.coordinator_resource``, default ``coordinator``: e.g. ``ray start --resources
'{"coordinator": 100}'`` on a CPU node, or a KubeRay group's ``rayStartParams.resources``), and,
on a cluster that declares none, to the head node: the node that runs the GCS, whose loss ends the
cluster anyway. A sliver of the resource is asked for, so it labels nodes rather than limits
coordinators.
"""

from __future__ import annotations

from typing import Any

from harness.config import SweepConfig

SLIVER = 0.001  # of a labelling resource: any number of coordinators fit on a node that has it


def declared_coordinator(sweep: SweepConfig) -> str | None:
    """The coordinator resource's name when some node of the cluster declares it."""
    import ray

    name = sweep.cluster.coordinator_resource
    return name if name and ray.cluster_resources().get(name, 0) > 0 else None


def head_ip() -> str:
    """The head node's IP address: where the cluster's GCS runs. A host name (KubeRay's head
    service, e.g. ``raycluster-head-svc``) is resolved, since ``node:<ip>`` resources carry IPs."""
    import socket

    import ray

    host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0].strip("[]")
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def head_node_id() -> str:
    """The head node's id: the live node at the GCS's address (this process's own node if several
    share it, as the nodes of a test cluster on one machine do)."""
    import ray

    ip, here = head_ip(), ray.get_runtime_context().get_node_id()
    at_ip = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("NodeManagerAddress") == ip]
    return here if here in at_ip or not at_ip else at_ip[0]


def coordinator_resources(sweep: SweepConfig) -> dict[str, float]:
    """Resources that place a Tune trial (a Ray Train driver) with the coordinators: a sliver of
    the coordinator resource, else of the head node's ``node:<ip>`` resource."""
    name = declared_coordinator(sweep)
    return {name: SLIVER} if name else {f"node:{head_ip()}": SLIVER}


def coordinator_options(sweep: SweepConfig) -> dict[str, Any]:
    """``.options()`` for a coordinating Ray task: a sliver of the coordinator resource, else
    pinned to the head node (hard affinity: the task waits for that node rather than landing on a
    spot node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = declared_coordinator(sweep)
    if name:
        return {"resources": {name: SLIVER}}
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=head_node_id(), soft=False)}
