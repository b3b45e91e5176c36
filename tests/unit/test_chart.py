"""The chart's files against the rest of the repository, without helm: versions, the CRD copy,
kopf's peering CRDs, the documented values, the images and the alert runbooks."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from cpt_operator.kube.builders import CONFIG_DIR, CONFIG_FILE

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "cpt-operator"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CHART_YAML = yaml.safe_load((CHART / "Chart.yaml").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def test_chart_app_version_is_the_package_version() -> None:
    assert CHART_YAML["appVersion"] == PYPROJECT["project"]["version"]


def test_default_image_tags_follow_the_app_version() -> None:
    # An empty tag renders as the appVersion (templates/_helpers.tpl); a pinned tag here would
    # drift from the code on the next release.
    assert VALUES["image"]["tag"] == "" and VALUES["trainer"]["image"]["tag"] == ""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert "(default .Chart.AppVersion .Values.image.tag)" in helpers
    assert "(default .Chart.AppVersion .Values.trainer.image.tag)" in helpers


def test_chart_crd_is_a_byte_for_byte_copy_of_the_generated_crd() -> None:
    assert (CHART / "crds" / "cptrun.yaml").read_bytes() == (ROOT / "crds" / "cptrun.yaml").read_bytes(), (
        "charts/cpt-operator/crds/cptrun.yaml differs from crds/cptrun.yaml: "
        "cp crds/cptrun.yaml charts/cpt-operator/crds/")


def test_chart_ships_kopf_peering_crds_for_both_scopes() -> None:
    docs = list(yaml.safe_load_all((CHART / "crds" / "kopf-peerings.yaml").read_text()))
    by_name = {d["metadata"]["name"]: d["spec"] for d in docs}
    assert by_name["clusterkopfpeerings.kopf.dev"]["scope"] == "Cluster"
    assert by_name["kopfpeerings.kopf.dev"]["scope"] == "Namespaced"
    for spec in by_name.values():
        assert spec["group"] == "kopf.dev"
        (version,) = spec["versions"]
        assert version["name"] == "v1" and version["served"] and version["storage"]
        # kopf writes its peers into status: the structural schema must keep them.
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status["x-kubernetes-preserve-unknown-fields"] is True


_KEY = re.compile(r"^(\s*)([A-Za-z][\w.-]*):\s*(\S.*)?$")


def _leaf_keys_without_comment(text: str) -> list[str]:
    """Leaf keys with no comment right above them or above a block they sit in (the keys of a
    documented `resources:` or `securityContext:` block share its comment)."""
    lines = text.splitlines()

    def commented(i: int) -> bool:
        return i > 0 and lines[i - 1].strip().startswith("#")

    def parent(i: int) -> int | None:
        indent = len(lines[i]) - len(lines[i].lstrip())
        for j in range(i - 1, -1, -1):
            match = _KEY.match(lines[j])
            if match and len(match[1]) < indent:
                return j
        return None

    missing = []
    for i, line in enumerate(lines):
        match = _KEY.match(line)
        if not match or not match[3]:
            continue
        j: int | None = i
        while j is not None and not commented(j):
            j = parent(j)
        if j is None:
            missing.append(f"line {i + 1}: {line.strip()}")
    return missing


def test_values_are_documented_line_by_line() -> None:
    text = (CHART / "values.yaml").read_text()
    assert text.startswith("# yaml-language-server: $schema=values.schema.json")
    assert _leaf_keys_without_comment(text) == []


def test_values_schema_closes_every_object_it_declares() -> None:
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict, path: str) -> list[str]:
        open_objects = []
        if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
            open_objects.append(path or "<root>")
        for key, child in node.get("properties", {}).items():
            open_objects += walk(child, f"{path}.{key}")
        return open_objects

    assert walk(schema, "") == []
    # Every top-level key of values.yaml is declared (the schema would reject the defaults).
    assert set(VALUES) <= set(schema["properties"])


@pytest.mark.parametrize("dockerfile, extra, forbidden", [
    ("operator/Dockerfile", "operator", "torch"),
    ("trainer/Dockerfile", "trainer", "kopf"),
], ids=["operator image installs the operator extra", "trainer image installs the trainer extra"])
def test_images_install_their_extra_from_the_repository_pyproject(dockerfile: str, extra: str,
                                                                  forbidden: str) -> None:
    text = (ROOT / dockerfile).read_text()
    assert extra in PYPROJECT["project"]["optional-dependencies"]
    assert "COPY pyproject.toml" in text
    assert re.search(rf'pip install "\.\[{extra}\]"', text), f"{dockerfile} must pip install .[{extra}]"
    # Dependencies come only from the extra; the package's own wheel goes in without any.
    installs = re.findall(r"pip install ([^\n&]+)", text)
    assert all(f"[{extra}]" in line or line.startswith("--no-deps ") for line in installs), installs
    names = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower()
             for dep in PYPROJECT["project"]["optional-dependencies"][extra]}
    assert forbidden not in names
    # Non-root at run time, with the uid the chart's securityContext expects.
    assert re.search(r"^USER 10001(:10001)?$", text, re.M)
    assert VALUES["operator"]["podSecurityContext"]["runAsUser"] == 10001


@pytest.mark.parametrize("dockerfile, ships, leaves_out", [
    ("operator/Dockerfile", ["api/cpt_api", "operator/cpt_operator"], "trainer/cpt_trainer"),
    ("trainer/Dockerfile", ["api/cpt_api", "trainer/cpt_trainer"], "operator/cpt_operator"),
], ids=["the operator image ships the contract and the operator",
        "the trainer image ships the contract and the trainer"])
def test_each_image_ships_the_contract_package_and_its_own_package_only(dockerfile: str, ships: list[str],
                                                                        leaves_out: str) -> None:
    copied = re.findall(r"^COPY (?!--from)(\S+)", (ROOT / dockerfile).read_text(), re.M)
    assert [c for c in copied if c.endswith(("cpt_api", "cpt_operator", "cpt_trainer"))] == ships
    assert leaves_out not in copied


def test_both_images_build_from_a_python_base_given_as_a_build_argument() -> None:
    """No CUDA base for the trainer: PyPI's torch wheels bring the CUDA libraries, the node the
    driver. The tests build both FROM a local Debian base through the same argument."""
    trainer = (ROOT / "trainer" / "Dockerfile").read_text()
    operator = (ROOT / "operator" / "Dockerfile").read_text()
    for text in (trainer, operator):
        assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
        assert re.findall(r"^FROM (\S+)", text, re.M)[0] == "${PYTHON_IMAGE}"
    assert not [line for line in re.findall(r"^(?:FROM|ARG) .*", trainer, re.M) if "cuda" in line.lower()]
    assert "apt-get" not in trainer and "add-apt-repository" not in trainer
    assert 'CMD ["python", "-m", "cpt_operator.kube"]' in operator
    # The operator's pods set their own command; the default runs the same launcher on one process.
    assert not re.search(r"^ENTRYPOINT", trainer, re.M)
    assert re.search(r'^CMD \["python", "-m", "cpt_trainer.launch", .*"-m", "cpt_trainer", "--config", '
                     rf'"{CONFIG_DIR}/{CONFIG_FILE}"\]$', trainer, re.M)


@pytest.mark.parametrize("dockerfile, repository", [
    ("operator/Dockerfile", VALUES["image"]["repository"]),
    ("trainer/Dockerfile", VALUES["trainer"]["image"]["repository"]),
])
def test_documented_build_command_tags_the_chart_default_image(dockerfile: str, repository: str) -> None:
    text = (ROOT / dockerfile).read_text()
    assert f"-t {repository}:{CHART_YAML['appVersion']} ." in text


def _github_anchor(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_every_alert_links_to_an_existing_runbook_section() -> None:
    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    anchors = {_github_anchor(h) for h in re.findall(r"^#+ (.+)$", runbooks, re.M)}
    rules = yaml.safe_load((CHART / "rules" / "cpt-operator.rules.yaml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "CptStabilityGapOpening", "CptGateBreached", "CptLossSpike", "CptNonFiniteLoss",
        "CptTrainingStalled", "CptCheckpointTooOld", "CptTrainerDown"}
    for alert in alerts:
        url = alert["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == "https://github.com/cpt-operator/cpt-operator/blob/main/docs/runbooks.md"
        assert anchor == alert["alert"].lower() and anchor in anchors, url
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
