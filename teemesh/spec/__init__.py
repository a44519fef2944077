"""The cluster spec: one YAML document describing a whole mesh, and the plan derived from it.

    load_spec(path) -> ClusterSpec        shape and plan-time checks, every problem at once
    plan_cluster(spec) -> Plan            CVM names and addresses, route VIPs (pure)
    group_app_compose(spec, group)        the bytes a group's CVMs are measured by
    cluster_policy(plan, platform_key)    what the coordinators admit by
    sidecar_config(plan, cvm, urls, pin)  each CVM's sidecar configuration
    command_env(plan, cvm)                what a replica's command sees

A spec in brief::

    cluster: starter
    tee: simulated
    workload_groups:
      api:
        replicas: 2
        command: python -m teemesh.examples.starter --port 8080
        backends: {api: {port: 8080, public: true}}
        routes: {api: {backend: api}}
      worker:
        replicas: 5
        command: python -m teemesh.examples.starter --port 9090
        backends: {worker: {port: 9090}}
        routes: {worker: {backend: worker, callers: [api]}}
"""

from __future__ import annotations

from teemesh.spec.checks import spec_problems, spec_warnings
from teemesh.spec.load import load_spec, parse_spec
from teemesh.spec.model import (
    RESERVED_GROUPS,
    SIM_OS_IMAGE,
    Backend,
    ClusterSpec,
    Route,
    WorkloadGroup,
)
from teemesh.spec.plan import Cvm, Plan, PlannedRoute, plan_cluster
from teemesh.spec.render import (
    AppComposes,
    app_id,
    app_ids,
    cluster_policy,
    command_env,
    coordinator_attest_policy,
    gateway_settings,
    group_app_compose,
    os_image_hashes,
    public_endpoints,
    runs_sidecar,
    sidecar_config,
    system_app_compose,
)

__all__ = [
    "RESERVED_GROUPS",
    "SIM_OS_IMAGE",
    "AppComposes",
    "Backend",
    "ClusterSpec",
    "Cvm",
    "Plan",
    "PlannedRoute",
    "Route",
    "WorkloadGroup",
    "app_id",
    "app_ids",
    "cluster_policy",
    "command_env",
    "coordinator_attest_policy",
    "gateway_settings",
    "group_app_compose",
    "load_spec",
    "os_image_hashes",
    "parse_spec",
    "plan_cluster",
    "public_endpoints",
    "runs_sidecar",
    "sidecar_config",
    "spec_problems",
    "spec_warnings",
    "system_app_compose",
]
