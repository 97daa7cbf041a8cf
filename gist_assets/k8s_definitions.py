"""The code location for Kubernetes: the same graph, every step in its own pod.

Point the Helm chart's user-code deployment at ``-m gist_assets.k8s_definitions``.
Gradient steps carry a ``dagster-k8s/config`` tag asking for one GPU
(``nvidia.com/gpu: 1``); the rest run on CPU pods. The storage root
(``GIST_STORAGE_ROOT``) must be a volume shared by all pods (a ReadWriteMany
PersistentVolumeClaim, see deploy/k8s/values.yaml). Instance-wide pools keep at
most one DuckDB writer and as many gradient steps as there are GPUs
(deploy/k8s/dagster.yaml).
"""

from dagster_k8s import k8s_job_executor

from .definitions import build_definitions

defs = build_definitions(executor=k8s_job_executor)
