"""Kubernetes backend: the reconcile core with cluster hands (kopf, Jobs, Prometheus).

Layers, lowest first: `settings`, `builders` / `launcher` / `prometheus` conversion (pure),
`observe` (merges what was seen into the core's `Observed`), `client` (the only module that talks
to the Kubernetes API), `handlers` (kopf), `webhook`, `metrics`, `__main__`.
"""
