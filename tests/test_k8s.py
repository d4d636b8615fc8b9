"""The Kubernetes manifests (deploy/k8s): rendered with `kubectl kustomize` and validated against the
Kubernetes API schemas (kubernetes-validate, strict: an unknown field is an error). No cluster runs
here; these tests check what can be checked without one, and that the parts agree with each other."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

OVERLAYS = ["cpu", "gpu", "tls"]
# The oldest Kubernetes the manifests target and the newest schemas.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def kubectl() -> str:
    """kubectl with a kustomize that renders the overlays (scripts/k8s-tools.sh installs one)."""
    path = shutil.which("kubectl") or shutil.which("kubectl", path=str(ROOT / ".tools" / "bin"))
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing: scripts/k8s-tools.sh should have installed it")
        pytest.skip("kubectl is not installed (run scripts/k8s-tools.sh)")
    return path


def render(overlay: str) -> list[dict]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render_and_validate_against_the_kubernetes_schemas(overlay: str, version: str) -> None:
    docs = render(overlay)
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError
    kinds = {(doc["apiVersion"], doc["kind"]) for doc in docs}
    assert kinds == {
        ("v1", "PersistentVolumeClaim"),
        ("batch/v1", "Job"),
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("policy/v1", "PodDisruptionBudget"),
    }


def test_a_wrong_manifest_is_refused_by_the_validation() -> None:
    # The check above can fail: a misspelt field and a wrong type are both errors.
    deployment = by_kind(render("cpu"))[("Deployment", "convserve")]
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 20
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    del deployment["spec"]["template"]["spec"]["terminationGracePeriod"]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_server_deployment_is_probed_drained_bounded_and_unprivileged(overlay: str) -> None:
    docs = by_kind(render(overlay))
    pod = docs[("Deployment", "convserve")]["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    # HTTP probes of the Open Inference Protocol's health routes, on the HTTP port the server listens on
    # (they work under TLS too, with scheme HTTPS, where Kubernetes' gRPC probe cannot).
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["grpc"] == int(env_of(server)["CONVSERVE_PORT"]) == 8500
    assert ports["http"] == int(env_of(server)["CONVSERVE_HTTP_PORT"]) == 8501
    paths = {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready"}
    paths["livenessProbe"] = "/v2/health/live"
    handlers = {"exec", "grpc", "httpGet", "tcpSocket"}
    for probe, path in paths.items():
        assert handlers & set(server[probe]) == {"httpGet"}, f"{probe}: one handler (an overlay merges)"
        scheme = {"scheme": "HTTPS"} if overlay == "tls" else {}  # the HTTP port speaks TLS there
        assert server[probe]["httpGet"] == {"path": path, "port": "http", **scheme}, probe
    # Stopping: preStop's sleep, then the server's --grace-s, inside terminationGracePeriodSeconds.
    sleep = int(server["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = float(env_of(server)["CONVSERVE_GRACE_S"])
    assert sleep >= 3 and pod["terminationGracePeriodSeconds"] >= sleep + grace + 3
    assert server["resources"]["requests"] and server["resources"]["limits"]
    security = server["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and "/tmp" in mounts
    gpu = server["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpu == "1") == (overlay == "gpu")
    assert (env_of(server)["CONVSERVE_DEVICE"] == "cuda") == (overlay == "gpu")
    assert server["image"].startswith("convserve-serve-gpu" if overlay == "gpu" else "convserve-serve:")


def test_services_hpa_and_pdb_select_the_server_pods() -> None:
    docs = by_kind(render("cpu"))
    labels = docs[("Deployment", "convserve")]["spec"]["template"]["metadata"]["labels"]
    plain, headless = docs[("Service", "convserve")], docs[("Service", "convserve-headless")]
    (server,) = docs[("Deployment", "convserve")]["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"] for p in server["ports"]}
    for service in (plain, headless):
        assert service["spec"]["selector"].items() <= labels.items()
        ports = {p["name"]: (p["port"], p["targetPort"], p["appProtocol"]) for p in service["spec"]["ports"]}
        assert ports == {"grpc": (8500, "grpc", "grpc"), "http": (8501, "http", "http")}
        assert {target for _, target, _ in ports.values()} <= container_ports
    assert headless["spec"]["clusterIP"] == "None" and plain["spec"].get("clusterIP") != "None"
    pdb = docs[("PodDisruptionBudget", "convserve")]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    hpa = docs[("HorizontalPodAutoscaler", "convserve")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "convserve" and hpa["minReplicas"] >= 2


def test_the_train_job_writes_the_claim_the_servers_read() -> None:
    docs = by_kind(render("cpu"))
    train = docs[("Job", "convserve-train")]["spec"]["template"]["spec"]
    server = docs[("Deployment", "convserve")]["spec"]["template"]["spec"]
    claim = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in train["volumes"]}
    assert claim["models"] == "convserve-models"
    assert {
        v["persistentVolumeClaim"]["claimName"] for v in server["volumes"] if "persistentVolumeClaim" in v
    } == {"convserve-models"}
    assert "ReadWriteMany" in docs[("PersistentVolumeClaim", "convserve-models")]["spec"]["accessModes"]


def test_the_scoring_job_is_indexed_and_each_pod_scores_its_own_shard() -> None:
    job = by_kind(render("cpu"))[("Job", "convserve-score")]["spec"]
    assert job["completionMode"] == "Indexed"
    (score,) = job["template"]["spec"]["containers"]
    args = score["args"]
    shard = args[args.index("--shard") + 1]
    index_var, count = re.fullmatch(r"\$\((\w+)\)/(\d+)", shard).groups()
    assert int(count) == job["completions"], "--shard's COUNT must equal the Job's completions"
    (index_env,) = [e for e in score["env"] if e["name"] == index_var]
    field = index_env["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    out = args[args.index("--out") + 1]
    assert f"$({index_var})" in out, "each pod writes its own results file"
    assert args[args.index("--server") + 1].startswith("dns:///convserve-headless:")


def mounted_secret_files(pod: dict, container: dict) -> set[str]:
    """Paths of the files a container sees from the pod's Secret volumes."""
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    files = set()
    for mount in container.get("volumeMounts", []):
        if (secret := secrets.get(mount["name"])) is not None:
            keys = [i["path"] for i in secret.get("items", [])] or ["tls.crt", "tls.key", "ca.crt"]
            files |= {f"{mount['mountPath']}/{key}" for key in keys}
    return files


def test_the_tls_overlay_serves_tls_probes_over_https_and_the_job_trusts_the_ca() -> None:
    docs = by_kind(render("tls"))
    pod = docs[("Deployment", "convserve")]["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    files = mounted_secret_files(pod, server)
    assert {env_of(server)["CONVSERVE_TLS_CERT"], env_of(server)["CONVSERVE_TLS_KEY"]} <= files, files
    assert "CONVSERVE_TLS_CLIENT_CA" not in env_of(server)  # the kubelet's probes carry no certificate
    job = docs[("Job", "convserve-score")]["spec"]["template"]["spec"]
    (score,) = job["containers"]
    assert env_of(score)["CONVSERVE_CLIENT_TLS_CA"] in mounted_secret_files(job, score)
    secrets = {v["secret"]["secretName"] for spec in (pod, job) for v in spec["volumes"] if "secret" in v}
    assert secrets == {"convserve-tls"}
