"""The suite runs on the e2e test cluster: its fixtures, shared rather than repeated."""
from tests.e2e.conftest import kube_cluster, prometheus, s3_server  # noqa: F401
