//! Everything under deploy/ renders (with kustomize v5, installed by scripts/setup) into valid
//! Kubernetes objects that meet netiso's security bar, and the course baseline gives exactly the
//! intended reachability when netiso's own engine evaluates it.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use netiso::inventory::manifests::{Manifests, parse_into};
use netiso::policy::{Flow, PolicyEngine, Protocol, Verdict};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn kubectl() -> PathBuf {
    let installed = PathBuf::from("/opt/netiso-tools/kubectl");
    if installed.exists() { installed } else { PathBuf::from("kubectl") }
}

/// `kubectl kustomize DIR` as JSON values, one per object.
fn render(dir: &Path) -> Vec<Value> {
    let out = Command::new(kubectl()).arg("kustomize").arg(dir).output().expect("kubectl (scripts/setup installs it)");
    assert!(out.status.success(), "kustomize {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_saphyr::from_multiple_with_options(&text, serde_saphyr::options! { strict_booleans: true }).unwrap()
}

fn kustomizations() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![repo().join("deploy")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "kustomization.yaml") {
                found.push(dir.clone());
            }
        }
    }
    found.sort();
    found
}

/// The object as its Kubernetes type, which must hold all of it: a field the type does not have
/// (misspelled, misplaced, or from another API version) would be dropped by the API server or
/// refused by a strict apply, so it fails here.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> T {
    let what = format!("{} {}", v["kind"], v["metadata"]["name"]);
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut unknown = Vec::new();
    not_kept(v, &serde_json::to_value(&t).unwrap(), String::new(), &mut unknown);
    assert!(unknown.is_empty(), "{what}: fields its schema does not have: {unknown:?}");
    t
}

/// The CRD schemas of the custom kinds deploy/ uses (vendored in tests/fixtures/crds), by
/// `apiVersion` and kind.
fn crd_schema(api_version: &str, kind: &str) -> Option<Value> {
    static CRDS: std::sync::LazyLock<Vec<Value>> = std::sync::LazyLock::new(|| {
        ["kustomizations", "prometheusrules", "servicemonitors"]
            .iter()
            .map(|file| {
                let path = format!("{}/tests/fixtures/crds/{file}.yaml", env!("CARGO_MANIFEST_DIR"));
                serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
            })
            .collect()
    });
    let (group, version) = api_version.split_once('/')?;
    for crd in CRDS.iter() {
        if crd["spec"]["group"] == group && crd["spec"]["names"]["kind"] == kind {
            let versions = crd["spec"]["versions"].as_array().unwrap();
            let served = versions.iter().find(|v| v["name"] == version && v["served"] == true)?;
            return Some(served["schema"]["openAPIV3Schema"].clone());
        }
    }
    None
}

/// Where `v` breaks a CRD's structural schema: unknown fields, wrong types, missing required
/// fields, values outside an enum.
fn schema_errors(schema: &Value, v: &Value, path: &str, out: &mut Vec<String>) {
    if schema["x-kubernetes-int-or-string"] == true {
        if !(v.is_i64() || v.is_u64() || v.is_string()) {
            out.push(format!("{path}: not an integer or a string"));
        }
        return;
    }
    let fits = match schema["type"].as_str() {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !fits {
        out.push(format!("{path}: not of type {}", schema["type"]));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(v)
    {
        out.push(format!("{path}: {v} is none of {allowed:?}"));
    }
    if let Some(items) = v.as_array() {
        for (i, item) in items.iter().enumerate() {
            schema_errors(&schema["items"], item, &format!("{path}[{i}]"), out);
        }
    }
    let Some(fields) = v.as_object() else { return };
    for required in schema["required"].as_array().into_iter().flatten() {
        if !fields.contains_key(required.as_str().unwrap()) {
            out.push(format!("{path}.{}: required", required.as_str().unwrap()));
        }
    }
    let properties = schema["properties"].as_object();
    let open = schema["x-kubernetes-preserve-unknown-fields"] == true;
    for (key, value) in fields {
        let at = format!("{path}.{key}");
        match (properties.and_then(|p| p.get(key)), &schema["additionalProperties"]) {
            (Some(field), _) => schema_errors(field, value, &at, out),
            (None, additional) if additional.is_object() => schema_errors(additional, value, &at, out),
            (None, _)
                if open || (properties.is_none() && schema["type"] == "object" && path.ends_with(".metadata")) => {}
            (None, _) => out.push(format!("{at}: not in the schema")),
        }
    }
}

/// A custom object checked against its CRD's schema.
fn conforms(object: &Value) {
    let (api_version, kind) = (object["apiVersion"].as_str().unwrap(), object["kind"].as_str().unwrap());
    let schema = crd_schema(api_version, kind).unwrap_or_else(|| panic!("no CRD schema for {api_version} {kind}"));
    let mut errors = Vec::new();
    schema_errors(&schema, object, "", &mut errors);
    assert!(errors.is_empty(), "{kind} {}: {errors:?}", object["metadata"]["name"]);
}

/// Paths of `original` that `typed` (the same object through its type) lost or changed.
fn not_kept(original: &Value, typed: &Value, path: String, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                match b.get(key) {
                    Some(kept) => not_kept(value, kept, format!("{path}.{key}"), out),
                    None if value.is_null() => {}
                    None => out.push(format!("{path}.{key}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (value, kept)) in a.iter().zip(b).enumerate() {
                not_kept(value, kept, format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b || a.as_f64().is_some_and(|x| b.as_f64() == Some(x)) => {}
        _ => out.push(path),
    }
}

#[test]
fn every_manifest_renders_into_valid_objects_that_meet_the_security_bar() {
    let dirs = kustomizations();
    assert_eq!(dirs.len(), 8, "{dirs:?}");
    let mut daemonsets = 0;
    for dir in &dirs {
        for object in render(dir) {
            let kind = object["kind"].as_str().unwrap_or_default().to_owned();
            let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            match kind.as_str() {
                "Namespace" => {
                    let namespace = typed::<Namespace>(&object);
                    let labels = namespace.metadata.labels.unwrap_or_default();
                    if name == "netiso" {
                        let level = labels.get("pod-security.kubernetes.io/enforce").map(String::as_str);
                        assert_eq!(level, Some("privileged"), "netiso's pod is beyond baseline: say so");
                    }
                }
                "ServiceAccount" => drop(typed::<ServiceAccount>(&object)),
                "Service" => drop(typed::<Service>(&object)),
                "ConfigMap" if name == "netiso-api-ca" => {
                    let ca = typed::<k8s_openapi::api::core::v1::ConfigMap>(&object);
                    assert!(ca.data.is_none(), "the daemons fill it");
                    assert_eq!(
                        object["metadata"]["annotations"]["kustomize.toolkit.fluxcd.io/ssa"], "IfNotPresent",
                        "Flux must not reset what the daemons published"
                    );
                }
                "ConfigMap" => {
                    drop(typed::<k8s_openapi::api::core::v1::ConfigMap>(&object));
                    let dashboard = &object["data"]["netiso.json"];
                    let parsed: Value =
                        serde_json::from_str(dashboard.as_str().expect("dashboard in the ConfigMap")).unwrap();
                    assert!(!parsed["panels"].as_array().unwrap().is_empty());
                    assert_eq!(object["metadata"]["labels"]["grafana_dashboard"], "1");
                }
                "NetworkPolicy" => {
                    let p: NetworkPolicy = typed(&object);
                    let engine =
                        PolicyEngine::new(netiso::policy::ClusterState { policies: vec![p], ..Default::default() });
                    assert!(engine.errors().is_empty(), "{:?}", engine.errors());
                }
                "ClusterRole" | "Role" => {
                    let rules =
                        if kind == "Role" { typed::<Role>(&object).rules } else { typed::<ClusterRole>(&object).rules };
                    for rule in rules.unwrap_or_default() {
                        // Creating access reviews is how the API checks its callers, and patching
                        // the one ConfigMap of its namespace where it publishes its CA is how
                        // clients verify it; nothing else may be written.
                        let reviews =
                            rule.resources.iter().flatten().all(|r| r == "tokenreviews" || r == "subjectaccessreviews");
                        let published_ca = kind == "Role"
                            && rule.resources == Some(vec!["configmaps".to_owned()])
                            && rule.resource_names == Some(vec!["netiso-api-ca".to_owned()]);
                        for verb in &rule.verbs {
                            let allowed = ["get", "list", "watch"].contains(&verb.as_str())
                                || (reviews && verb == "create")
                                || (published_ca && verb == "patch");
                            assert!(allowed, "{kind} {name} grants `{verb}` on {:?}: read-only only", rule.resources);
                        }
                    }
                }
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&object)),
                "RoleBinding" => drop(typed::<RoleBinding>(&object)),
                "DaemonSet" => {
                    daemonsets += 1;
                    let ds: DaemonSet = typed(&object);
                    let spec = ds.spec.unwrap();
                    assert_eq!(spec.update_strategy.unwrap().type_.as_deref(), Some("RollingUpdate"));
                    let pod = spec.template.spec.unwrap();
                    assert_eq!(pod.host_network, Some(true));
                    assert!(
                        pod.tolerations.is_some_and(|t| t.iter().any(|t| t.operator.as_deref() == Some("Exists"))),
                        "runs on every node"
                    );
                    let mut mounts: Vec<String> = pod
                        .volumes
                        .iter()
                        .flatten()
                        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.clone()))
                        .collect();
                    mounts.sort();
                    assert_eq!(
                        mounts,
                        ["/run/netns", "/sys/kernel/btf", "/var/lib/netiso"],
                        "the host paths it needs, no more"
                    );
                    for c in pod.containers {
                        let image = c.image.unwrap();
                        let (_, tag) = image.rsplit_once(':').unwrap_or_else(|| panic!("{image} has no tag"));
                        assert!(
                            image.contains("@sha256:") || (tag != "latest" && !tag.contains('/')),
                            "{image} is not pinned"
                        );
                        let sc = c.security_context.unwrap();
                        assert_ne!(sc.privileged, Some(true), "no privileged container");
                        assert_eq!(sc.read_only_root_filesystem, Some(true));
                        assert_eq!(sc.allow_privilege_escalation, Some(false));
                        let seccomp = sc.seccomp_profile.clone().map(|p| p.type_);
                        assert!(
                            matches!(seccomp.as_deref(), Some("Unconfined" | "Localhost")),
                            "a seccomp profile that allows bpf() is chosen, not left to the runtime's default: {seccomp:?}"
                        );
                        let caps = sc.capabilities.unwrap();
                        assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]));
                        for cap in caps.add.unwrap() {
                            assert!(
                                ["BPF", "PERFMON", "NET_ADMIN", "SYSLOG"].contains(&cap.as_str()),
                                "capability {cap} is not on the list"
                            );
                        }
                        let args = c.args.clone().unwrap_or_default();
                        assert!(
                            args.contains(&"--api-auth=kubernetes".to_owned()),
                            "the API is authenticated: {args:?}"
                        );
                        assert!(
                            args.contains(&"--publish-api-ca=$(POD_NAMESPACE)/netiso-api-ca".to_owned()),
                            "clients can verify it: {args:?}"
                        );
                        assert_eq!(c.liveness_probe.unwrap().http_get.unwrap().path.as_deref(), Some("/healthz"));
                        assert_eq!(c.readiness_probe.unwrap().http_get.unwrap().path.as_deref(), Some("/readyz"));
                        let resources = c.resources.unwrap();
                        assert!(resources.requests.is_some() && resources.limits.is_some(), "requests and limits");
                    }
                }
                "ServiceMonitor" => {
                    conforms(&object);
                    assert_eq!(object["spec"]["endpoints"][0]["path"], "/metrics");
                }
                "PrometheusRule" => {
                    conforms(&object);
                    let alerts: Vec<&str> = object["spec"]["groups"][0]["rules"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter_map(|r| r["alert"].as_str())
                        .collect();
                    for a in [
                        "NetisoDropSurge",
                        "NetisoNewPolicyDropsInProduction",
                        "NetisoNewPolicyDrops",
                        "NetisoDatapathLosses",
                        "NetisoInventoryStale",
                        "NetisoDown",
                    ] {
                        assert!(alerts.contains(&a), "alert {a}");
                    }
                }
                "Kustomization" => flux_kustomization(&object),
                other => panic!("{} renders an unexpected {other} {name}", dir.display()),
            }
        }
    }
    assert_eq!(daemonsets, 1);
    let flux = render(&repo().join("deploy/flux"));
    let names: Vec<String> = flux.iter().map(|o| o["metadata"]["name"].as_str().unwrap().to_owned()).collect();
    for n in [
        "network-policies-develop",
        "network-policies-staging",
        "network-policies-production",
        "netiso",
        "netiso-monitoring",
    ] {
        assert!(names.contains(&n.to_owned()), "Flux Kustomization {n}");
    }
    // The cluster's entry point, reconciled by the Kustomization `flux bootstrap` makes for
    // clusters/example (Flux renders a directory without a kustomization file whole).
    let entry: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(repo().join("clusters/example/netiso.yaml")).unwrap()).unwrap();
    assert!(!repo().join("clusters/example/kustomization.yaml").exists(), "bootstrap adds flux-system beside it");
    flux_kustomization(&entry);
    assert_eq!(entry["spec"]["path"], "./deploy/flux");
    // The rollback is applied by hand (`kubectl apply -n NAMESPACE -k`), outside Flux: it renders
    // one allow-all without a namespace, for -n to choose.
    let rollback = render(&repo().join("deploy/network-policies/rollback"));
    assert_eq!(rollback.len(), 1, "{rollback:?}");
    assert!(rollback[0]["metadata"].get("namespace").is_none(), "{rollback:?}");
    let rollback: NetworkPolicy = typed(&rollback[0]);
    assert_eq!(rollback.spec.unwrap().policy_types.unwrap(), ["Ingress", "Egress"]);
    for flux in &flux {
        let path = flux["spec"]["path"].as_str().unwrap_or_default();
        assert!(!path.contains("rollback"), "Flux must not apply the rollback: {path}");
    }
}

/// A Flux Kustomization as shipped: valid for its CRD, its path renders, it reconciles from the
/// repository Flux was bootstrapped with, retries on its own, and nothing waits on netiso or its
/// monitoring.
fn flux_kustomization(object: &Value) {
    conforms(object);
    let name = object["metadata"]["name"].as_str().unwrap();
    let spec = &object["spec"];
    let path = spec["path"].as_str().unwrap();
    assert!(repo().join(path.trim_start_matches("./")).join("kustomization.yaml").exists(), "{name}: {path} exists");
    assert_eq!(spec["sourceRef"], json!({"kind": "GitRepository", "name": "flux-system"}), "{name}");
    assert!(spec["retryInterval"].is_string() && spec["timeout"].is_string(), "{name}: retries and times out");
    assert_eq!(spec["prune"], true, "{name}");
    assert!(spec.get("dependsOn").is_none(), "{name} must not wait for another Kustomization");
    if name == "netiso" {
        assert_eq!(spec["wait"], true, "netiso is Ready once its DaemonSet is");
    }
}

/// The course's namespaces and pods, with the baseline as the overlays render it.
fn course_with_baseline() -> PolicyEngine {
    let model = r#"
kind: Namespace
metadata: {name: develop, labels: {kubernetes.io/metadata.name: develop}}
---
kind: Namespace
metadata: {name: staging, labels: {kubernetes.io/metadata.name: staging}}
---
kind: Namespace
metadata: {name: production, labels: {kubernetes.io/metadata.name: production}}
---
kind: Namespace
metadata: {name: ingress-nginx, labels: {kubernetes.io/metadata.name: ingress-nginx}}
---
kind: Namespace
metadata: {name: kube-system, labels: {kubernetes.io/metadata.name: kube-system}}
---
kind: Pod
metadata: {name: web, namespace: develop, labels: {app: web}}
status: {podIP: 10.0.1.1}
---
kind: Pod
metadata: {name: web, namespace: staging, labels: {app: web}}
status: {podIP: 10.0.2.1}
---
kind: Pod
metadata: {name: api, namespace: production, labels: {app: api}}
status: {podIP: 10.0.3.1}
---
kind: Pod
metadata: {name: controller, namespace: ingress-nginx, labels: {app.kubernetes.io/name: ingress-nginx}}
status: {podIP: 10.0.4.1}
---
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
status: {podIP: 10.0.5.1}
"#;
    let mut m = Manifests::default();
    parse_into(Path::new("model.yaml"), model, &mut m).unwrap();
    for ns in ["develop", "staging", "production"] {
        for object in render(&repo().join("deploy/network-policies/overlays").join(ns)) {
            let p: NetworkPolicy = typed(&object);
            assert_eq!(p.metadata.namespace.as_deref(), Some(ns));
            m.state.policies.push(p);
        }
    }
    let engine = PolicyEngine::new(m.state);
    assert!(engine.errors().is_empty(), "{:?}", engine.errors());
    engine
}

fn verdict(e: &PolicyEngine, from: &str, to: &str, port: u16, protocol: Protocol) -> Verdict {
    e.verdict(&Flow { from: from.parse().unwrap(), to: to.parse().unwrap(), port, protocol }).unwrap()
}

#[test]
fn the_baseline_gives_the_intended_reachability() {
    let e = course_with_baseline();
    for app in ["develop/web", "staging/web", "production/api"] {
        assert_eq!(verdict(&e, app, "kube-system/coredns", 53, Protocol::Udp), Verdict::Allowed, "DNS/UDP from {app}");
        assert_eq!(verdict(&e, app, "kube-system/coredns", 53, Protocol::Tcp), Verdict::Allowed, "DNS/TCP from {app}");
        assert_eq!(
            verdict(&e, app, "kube-system/coredns", 80, Protocol::Tcp),
            Verdict::Denied,
            "only DNS to kube-dns from {app}"
        );
        assert_eq!(
            verdict(&e, "ingress-nginx/controller", app, 8080, Protocol::Tcp),
            Verdict::Allowed,
            "ingress-nginx -> {app}"
        );
    }
    assert_eq!(verdict(&e, "develop/web", "production/api", 8080, Protocol::Tcp), Verdict::Denied);
    assert_eq!(verdict(&e, "staging/web", "production/api", 8080, Protocol::Tcp), Verdict::Denied);
    assert_eq!(verdict(&e, "production/api", "develop/web", 8080, Protocol::Tcp), Verdict::Denied);
    assert_eq!(
        verdict(&e, "production/api", "203.0.113.10", 443, Protocol::Tcp),
        Verdict::Denied,
        "no egress to the world"
    );
}

#[test]
#[should_panic(expected = "fields its schema does not have: [\".spec.podSelectr\"]")]
fn a_misspelled_field_fails_the_schema_check() {
    typed::<NetworkPolicy>(&json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "x"},
        "spec": {"podSelector": {}, "podSelectr": {}},
    }));
}

#[test]
fn custom_objects_are_checked_against_their_crds() {
    let kustomization = |spec: Value| {
        json!({"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
            "metadata": {"name": "x", "namespace": "flux-system"}, "spec": spec})
    };
    let good = json!({"interval": "10m", "sourceRef": {"kind": "GitRepository", "name": "flux-system"}, "prune": true});
    conforms(&kustomization(good.clone()));
    for (spec, error) in [
        (
            json!({"interval": "10m", "sourceRef": {"kind": "GitRepository", "name": "flux-system"}, "prune": true, "retryIntervall": "1m"}),
            ".spec.retryIntervall: not in the schema",
        ),
        (json!({"interval": "10m", "prune": true}), ".spec.sourceRef: required"),
        (
            json!({"interval": "10m", "sourceRef": {"kind": "Bucket2", "name": "x"}, "prune": true}),
            ".spec.sourceRef.kind",
        ),
        (
            json!({"interval": "10m", "sourceRef": {"kind": "GitRepository", "name": "x"}, "prune": "yes"}),
            ".spec.prune: not of type",
        ),
    ] {
        let mut errors = Vec::new();
        schema_errors(
            &crd_schema("kustomize.toolkit.fluxcd.io/v1", "Kustomization").unwrap(),
            &kustomization(spec),
            "",
            &mut errors,
        );
        assert!(errors.iter().any(|e| e.starts_with(error)), "{error}: {errors:?}");
    }
}
