"""Kueue's names that the operator, the chart and the tests share (sigs.k8s.io/kueue v0.17)."""
from __future__ import annotations

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
WORKLOADS = "workloads"

LABEL_QUEUE = f"{GROUP}/queue-name"
"""On a Job: the LocalQueue that admits it (Kueue manages only Jobs that carry it)."""
LABEL_PRIORITY = f"{GROUP}/priority-class"
"""On a Job: the WorkloadPriorityClass of its Workload (preemption order within a ClusterQueue)."""
LABEL_JOB_UID = f"{GROUP}/job-uid"
"""On a Workload: the uid of the Job it stands for."""
