"""Two tenants on one cluster, on the real control plane: the chart installed for one watched
namespace with a platform team's allow-lists (tests/tenancy_cases.py).

- Admission: the chart's ValidatingAdmissionPolicy refuses at `kubectl apply` every case the
  operator's own check refuses (tests/unit/policy/test_tenancy.py runs the same cases there), in a
  tenant's namespace, and lets a stored run that predates a change of policy still be stopped.
- RBAC: the operator's ServiceAccount may get Secrets in the watched namespace only (checked with
  `kubectl auth can-i` as that ServiceAccount), never list them, and has nothing cluster-wide.

kwok plays the kubelet: the operator's pods need not run for either check. The endpoint inside a
Secret, which admission cannot see, is checked by the running operator in
test_checkpoint_s3.py."""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.test_helm_install import CHART, ensure_crds, ensure_namespace, helm
from tests.e2e.test_operator import cptrun
from tests.tenancy_cases import ALLOWED_RESOURCES, CASES, POLICY

pytestmark = [pytest.mark.cluster, pytest.mark.helm, pytest.mark.timeout(240)]


def test_a_tenants_runs_are_held_to_the_allow_lists_and_the_operator_to_its_namespaces(
        kube_cluster: Any, helm_bin: Path, namespace: str, tmp_path: Path) -> None:
    kube = kube_cluster
    ensure_crds(kube, CHART / "crds" / "cptrun.yaml")
    tenant_a, tenant_b = f"{namespace}-a", f"{namespace}-b"
    for ns in (tenant_a, tenant_b):
        ensure_namespace(kube, ns)
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"operator": {"namespaces": [tenant_a]}, "tenancy": POLICY}))
    release = f"t{uuid.uuid4().hex[:6]}"
    install = helm(helm_bin, kube, "install", release, str(CHART), "-n", namespace, "-f", str(values),
                   "--skip-crds")
    assert install.returncode == 0, install.stderr
    fullname = f"{release}-cpt-operator"
    try:
        def apply(name: str, resources: dict[str, Any], dry_run: bool = True) -> Any:
            doc = cptrun(name, "tenant-a-bucket", resources={"nodes": 1, "gpusPerNode": 1, **resources})
            extra = ["--dry-run=server"] if dry_run else []
            return kube.kubectl_result("apply", "-n", tenant_a, *extra, "-f", "-", input=json.dumps(doc))

        # the policy is served once the API server has loaded it
        kube.wait_for(lambda: apply("probe", {"image": "docker.io/x:1"}).returncode != 0 or None,
                      "the admission policy in force", timeout=60)
        for case, resources, refused in CASES:
            result = apply(case, resources)
            if refused is None:
                assert result.returncode == 0, f"{case}: {result.stderr}"
            else:
                assert result.returncode != 0, f"{case} was admitted"
                assert refused in result.stderr and "allow" in result.stderr, f"{case}: {result.stderr}"
                assert "ValidatingAdmissionPolicy" in result.stderr, result.stderr

        # A stored run stays stoppable when the policy tightens: only a change of its spec is checked.
        assert apply("kept", ALLOWED_RESOURCES, dry_run=False).returncode == 0
        narrowed = helm(helm_bin, kube, "upgrade", release, str(CHART), "-n", namespace, "--reuse-values",
                        "--set", "tenancy.secrets={team-a-s3-v2}", "--skip-crds")
        assert narrowed.returncode == 0, narrowed.stderr
        kube.wait_for(lambda: apply("probe", {**ALLOWED_RESOURCES}).returncode != 0 or None,
                      "the narrowed policy in force", timeout=60)
        stop = kube.kubectl_result("annotate", "cptrun", "kept", "-n", tenant_a, "cpt.mlops.dev/stop=true")
        assert stop.returncode == 0, stop.stderr
        edit = kube.kubectl_result("patch", "cptrun", "kept", "-n", tenant_a, "--type", "merge", "-p",
                                   json.dumps({"spec": {"budget": {"steps": 200}}}))
        assert edit.returncode != 0 and "resources.s3SecretRef is not allowed" in edit.stderr, edit.stderr

        sa = f"system:serviceaccount:{namespace}:{fullname}"

        def can(verb: str, resource: str, ns: str | None) -> str:
            where = ["-n", ns] if ns else ["--all-namespaces"]
            return kube.kubectl_result("auth", "can-i", verb, resource, *where, "--as", sa).stdout.strip()

        assert can("get", "secrets", tenant_a) == "yes"  # the Secret a run names, by name
        assert [can(v, "secrets", tenant_a) for v in ("list", "watch")] == ["no", "no"]
        assert [can(v, "secrets", tenant_b) for v in ("get", "list")] == ["no", "no"]
        assert can("get", "secrets", None) == "no" and can("create", "jobs.batch", tenant_b) == "no"
    finally:
        kube.kubectl_result("delete", "cptrun", "--all", "-n", tenant_a, "--wait=false")
        helm(helm_bin, kube, "uninstall", release, "-n", namespace)
        for ns in (tenant_a, tenant_b):
            kube.kubectl_result("delete", "namespace", ns, "--wait=false")
