//! Reads Namespaces, Pods and NetworkPolicies from YAML or JSON manifests: a file or a directory
//! of them, multi-document, `kind: List` accepted. A directory with a kustomization is rendered as
//! Flux's kustomize-controller renders it (`kubectl kustomize`, or `kustomize build`). Every
//! problem names the file, the document and the object.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;
use thiserror::Error;

use super::{Change, Inventory, Kind, Object};
use crate::cluster::{ClusterState, ContainerPort, NamespaceInfo, NodeInfo, PodInfo, Protocol};

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: no .yaml, .yml or .json files")]
    Empty { path: PathBuf },
    #[error(
        "{path} is a kustomization: rendering it needs kubectl (`kubectl kustomize`) or kustomize on PATH, as Flux renders it"
    )]
    NoKustomize { path: PathBuf },
    #[error("{path}: kustomize could not render it: {message}")]
    Kustomize { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: document {document}: {message}")]
    Parse { path: PathBuf, document: usize, message: String },
}

/// Objects found, plus problems that did not stop the rest from loading.
#[derive(Debug, Default)]
pub struct Manifests {
    /// The engine's view: namespaces, pods and policies.
    pub state: ClusterState,
    /// Every object the inventory keeps, as read.
    pub objects: Vec<super::Object>,
    pub warnings: Vec<String>,
    /// Where each object was defined (`Kind namespace/name` -> `file: document N`), to name both
    /// places when one is defined again.
    origins: std::collections::HashMap<String, String>,
}

impl Manifests {
    /// Records where `object` (`Kind namespace/name`) is defined. A second definition replaces
    /// the first, as a second `kubectl apply` would, and is warned about naming both places;
    /// returns whether it was one.
    fn define(&mut self, object: String, file: &Path, document: usize) -> bool {
        let place = format!("{}: document {document}", file.display());
        match self.origins.insert(object.clone(), place.clone()) {
            Some(first) => {
                self.warnings.push(format!("{object} is defined twice, in {first} and in {place}; the latter is used"));
                true
            }
            None => false,
        }
    }
}

/// What to read: a manifest file, or a directory kustomize renders.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    File(PathBuf),
    Kustomization(PathBuf),
}

impl Source {
    fn path(&self) -> &Path {
        match self {
            Source::File(p) | Source::Kustomization(p) => p,
        }
    }
}

/// The files under `path`, and its directories with a kustomization (rendered whole, not walked
/// into, as Flux includes them).
fn sources(path: &Path) -> Result<Vec<Source>, ManifestError> {
    let meta = std::fs::metadata(path).map_err(|source| ManifestError::Read { path: path.into(), source })?;
    if meta.is_file() {
        return Ok(vec![Source::File(path.into())]);
    }
    let mut found = Vec::new();
    let mut walk = walkdir::WalkDir::new(path).follow_links(true).into_iter();
    while let Some(entry) = walk.next() {
        let entry = entry.map_err(|e| {
            let at = e.path().unwrap_or(path).to_path_buf();
            ManifestError::Read { path: at, source: e.into() }
        })?;
        let p = entry.path();
        if entry.file_type().is_dir() && is_kustomization(p) {
            found.push(Source::Kustomization(p.to_path_buf()));
            walk.skip_current_dir();
        } else if entry.file_type().is_file()
            && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
        {
            found.push(Source::File(p.to_path_buf()));
        }
    }
    // Full paths in order: a later file's definition of an object wins, as documented.
    found.sort_by(|a, b| a.path().cmp(b.path()));
    if found.is_empty() {
        return Err(ManifestError::Empty { path: path.into() });
    }
    Ok(found)
}

pub fn load(path: &Path) -> Result<Manifests, ManifestError> {
    let mut manifests = Manifests::default();
    for source in sources(path)? {
        match source {
            Source::File(file) => {
                let text = std::fs::read_to_string(&file)
                    .map_err(|source| ManifestError::Read { path: file.clone(), source })?;
                parse_into(&file, &text, &mut manifests)?;
            }
            Source::Kustomization(dir) => {
                let rendered = kustomize(&dir)?;
                parse_into(&PathBuf::from(format!("{} (rendered)", dir.display())), &rendered, &mut manifests)?;
            }
        }
    }
    Ok(manifests)
}

/// The names kustomize looks for in a directory.
const KUSTOMIZATION_FILES: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];

fn is_kustomization(dir: &Path) -> bool {
    KUSTOMIZATION_FILES.iter().any(|name| dir.join(name).is_file())
}

/// `dir` rendered: `kubectl kustomize DIR`, else `kustomize build DIR`.
fn kustomize(dir: &Path) -> Result<String, ManifestError> {
    let commands: [(&str, &[&str]); 2] = [("kubectl", &["kustomize"]), ("kustomize", &["build"])];
    for (program, args) in commands {
        let output = match std::process::Command::new(program).args(args).arg(dir).output() {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(ManifestError::Read { path: dir.into(), source }),
        };
        if !output.status.success() {
            let message = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            return Err(ManifestError::Kustomize { path: dir.into(), message });
        }
        return String::from_utf8(output.stdout)
            .map_err(|e| ManifestError::Kustomize { path: dir.into(), message: e.to_string() });
    }
    Err(ManifestError::NoKustomize { path: dir.into() })
}

/// Parses one file's text (YAML; JSON is YAML too). Documents are numbered as the file's
/// non-empty ones; a syntax error names its line and column. Only `true` and `false` are
/// booleans: the documents are read untyped first, and YAML 1.1's `y`, `n`, `yes`, `no`, `on`
/// and `off` are names and label values here, as Kubernetes reads them into its string fields.
pub fn parse_into(file: &Path, text: &str, out: &mut Manifests) -> Result<(), ManifestError> {
    let documents: Vec<Value> = serde_saphyr::from_multiple_with_options(
        text,
        serde_saphyr::options! {
            strict_booleans: true,
        },
    )
    .map_err(|e| ManifestError::Syntax { path: file.into(), message: e.to_string() })?;
    for (i, value) in documents.into_iter().enumerate() {
        if !value.is_null() {
            add_object(file, i + 1, value, out)?;
        }
    }
    Ok(())
}

fn describe(value: &Value) -> String {
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("object");
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("<unnamed>");
    match meta.and_then(|m| m.get("namespace")).and_then(|n| n.as_str()) {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

fn typed<T: serde::de::DeserializeOwned>(file: &Path, document: usize, value: Value) -> Result<T, ManifestError> {
    let what = describe(&value);
    serde_path_to_error::deserialize(value).map_err(|e| ManifestError::Parse {
        path: file.into(),
        document,
        message: format!("{what}: field {}: {}", e.path(), e.inner()),
    })
}

fn add_object(file: &Path, document: usize, value: Value, out: &mut Manifests) -> Result<(), ManifestError> {
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
    match kind.as_str() {
        "List" | "NamespaceList" | "PodList" | "NetworkPolicyList" => {
            let items = value.get("items").and_then(|i| i.as_array()).cloned().unwrap_or_default();
            for item in items {
                add_object(file, document, item, out)?;
            }
        }
        "Namespace" => {
            let ns: Namespace = typed(file, document, value)?;
            let name = ns.metadata.name.clone().unwrap_or_default();
            if out.define(format!("Namespace {name}"), file, document) {
                out.state.namespaces.retain(|n| n.name != name);
                out.objects.retain(|o| !matches!(o, Object::Namespace(n) if n.metadata.name.as_deref() == Some(&name)));
            }
            out.state.namespaces.push(NamespaceInfo { name, labels: ns.metadata.labels.clone().unwrap_or_default() });
            out.objects.push(Object::Namespace(ns));
        }
        "Pod" => {
            let pod: Pod = typed(file, document, value)?;
            match pod_info(&pod) {
                Ok(info) => {
                    if out.define(format!("Pod {}/{}", info.namespace, info.name), file, document) {
                        out.state.pods.retain(|p| (&p.namespace, &p.name) != (&info.namespace, &info.name));
                        out.objects.retain(|o| !matches!(o, Object::Pod(p) if same(&p.metadata, &pod.metadata)));
                    }
                    out.state.pods.push(info);
                    out.objects.push(Object::Pod(pod));
                }
                Err(e) => out.warnings.push(format!("{}: document {document}: {e}", file.display())),
            }
        }
        "NetworkPolicy" => {
            let policy: NetworkPolicy = typed(file, document, value)?;
            let key = format!(
                "NetworkPolicy {}/{}",
                policy.metadata.namespace.as_deref().unwrap_or("default"),
                policy.metadata.name.as_deref().unwrap_or_default()
            );
            if out.define(key, file, document) {
                out.state.policies.retain(|p| !same(&p.metadata, &policy.metadata));
                out.objects.retain(|o| !matches!(o, Object::NetworkPolicy(p) if same(&p.metadata, &policy.metadata)));
            }
            out.state.policies.push(policy.clone());
            out.objects.push(Object::NetworkPolicy(policy));
        }
        "Service" => out.objects.push(Object::Service(typed(file, document, value)?)),
        "Node" => {
            let node: Node = typed(file, document, value)?;
            let info = node_info(&node);
            if out.define(format!("Node {}", info.name), file, document) {
                out.state.nodes.retain(|n| n.name != info.name);
                out.objects.retain(|o| !matches!(o, Object::Node(n) if n.metadata.name == node.metadata.name));
            }
            out.state.nodes.push(info);
            out.objects.push(Object::Node(node));
        }
        "ReplicaSet" => out.objects.push(Object::ReplicaSet(typed(file, document, value)?)),
        "" => {
            return Err(ManifestError::Parse {
                path: file.into(),
                document,
                message: format!("{}: no `kind`", describe(&value)),
            });
        }
        // Deployments, Services and the like are not needed to decide a flow.
        _ => {}
    }
    Ok(())
}

/// Whether two objects' metadata name the same object (namespace defaulting as the API does).
fn same(a: &ObjectMeta, b: &ObjectMeta) -> bool {
    let namespace = |m: &ObjectMeta| m.namespace.clone().unwrap_or_else(|| "default".into());
    a.name == b.name && namespace(a) == namespace(b)
}

/// Feeds the inventory from manifests and reloads them when a file changes. A reload that fails
/// keeps the previous state (and says why); the inventory never loses data to a bad edit.
pub async fn follow(path: PathBuf, inventory: std::sync::Arc<Inventory>, poll: std::time::Duration) {
    let mut last_seen = None;
    loop {
        let stamp = fingerprint(&path);
        if stamp != last_seen {
            match load(&path) {
                Ok(m) => {
                    for w in &m.warnings {
                        tracing::warn!(warning = %w, "manifest problem");
                    }
                    for kind in Kind::ALL {
                        let objects = m.objects.iter().filter(|o| o.kind() == kind).cloned().collect();
                        inventory.apply(Change::Replace(kind, objects));
                    }
                    inventory.set_stale(Kind::Pod, false);
                    tracing::info!(path = %path.display(), objects = m.objects.len(), "manifests loaded");
                }
                Err(e) => {
                    inventory.set_stale(Kind::Pod, true);
                    tracing::error!(error = %e, "manifests could not be (re)loaded; keeping the previous inventory");
                }
            }
            last_seen = stamp;
        }
        tokio::time::sleep(poll).await;
    }
}

/// Modification times and sizes of the files under `path` (a kustomization's included): changes
/// when any file does.
fn fingerprint(path: &Path) -> Option<Vec<(PathBuf, std::time::SystemTime, u64)>> {
    let mut stamp = Vec::new();
    for entry in walkdir::WalkDir::new(path).follow_links(true).sort_by_file_name() {
        let entry = entry.ok()?;
        if entry.file_type().is_file() {
            let meta = entry.metadata().ok()?;
            stamp.push((entry.into_path(), meta.modified().ok()?, meta.len()));
        }
    }
    Some(stamp)
}

/// The engine's view of a Pod: labels, container ports and addresses.
/// A Node object's name and the IP addresses in its status (host names are left out).
pub fn node_info(node: &Node) -> NodeInfo {
    let addresses = node.status.iter().flat_map(|s| s.addresses.iter().flatten());
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in addresses.filter_map(|a| a.address.parse().ok()) {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    NodeInfo { name: node.metadata.name.clone().unwrap_or_default(), addresses: ips }
}

pub fn pod_info(pod: &Pod) -> Result<PodInfo, String> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let key = format!("Pod {namespace}/{name}");
    let mut ports = Vec::new();
    if let Some(spec) = &pod.spec {
        for container in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
            for p in container.ports.iter().flatten() {
                let protocol: Protocol = p
                    .protocol
                    .as_deref()
                    .unwrap_or("TCP")
                    .parse()
                    .map_err(|e| format!("{key}: container {}: {e}", container.name))?;
                let port = u16::try_from(p.container_port).ok().filter(|p| *p > 0).ok_or_else(|| {
                    format!(
                        "{key}: container {}: containerPort {} is out of range 1-65535",
                        container.name, p.container_port
                    )
                })?;
                ports.push(ContainerPort { name: p.name.clone(), port, protocol });
            }
        }
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    if let Some(status) = &pod.status {
        let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
        for text in status.pod_ip.as_deref().into_iter().chain(listed) {
            let ip: IpAddr = text.parse().map_err(|_| format!("{key}: status.podIP `{text}` is not an IP address"))?;
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    Ok(PodInfo {
        namespace,
        name,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ips,
        ports,
        host_network: pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAB: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: production, labels: {env: production}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: api, namespace: production, labels: {app: api}}
  spec:
    containers:
    - name: api
      image: api
      ports: [{name: http, containerPort: 8080}]
  status: {podIP: 10.0.0.2, podIPs: [{ip: 10.0.0.2}, {ip: "fd00::2"}]}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: deny, namespace: production}
  spec: {podSelector: {}}
---
{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ignored"}}
"#;

    #[test]
    fn reads_multi_document_yaml_lists_and_json() {
        let mut m = Manifests::default();
        parse_into(Path::new("lab.yaml"), LAB, &mut m).unwrap();
        assert_eq!(m.state.namespaces.len(), 1);
        assert_eq!(m.state.policies.len(), 1);
        let pod = &m.state.pods[0];
        assert_eq!(pod.key(), "production/api");
        assert_eq!(pod.ips.len(), 2);
        assert_eq!(pod.ports, vec![ContainerPort { name: Some("http".into()), port: 8080, protocol: Protocol::Tcp }]);
    }

    #[test]
    fn a_malformed_object_names_file_document_object_and_field() {
        let bad = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: n}\nspec: {ingress: {not: a-list}}\n";
        let err = parse_into(Path::new("bad.yaml"), bad, &mut Manifests::default()).unwrap_err().to_string();
        assert!(err.contains("bad.yaml: document 1: NetworkPolicy n/p: field spec.ingress"), "{err}");
        let broken = "kind: Pod\nmetadata: [\n";
        let err = parse_into(Path::new("broken.yaml"), broken, &mut Manifests::default()).unwrap_err().to_string();
        assert!(err.starts_with("broken.yaml: ") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn yaml_1_1_boolean_spellings_are_strings_as_in_kubernetes() {
        let text = "kind: Namespace\nmetadata: {name: n, labels: {canary: yes, tier: on, team: y}}\n";
        let mut m = Manifests::default();
        parse_into(Path::new("ns.yaml"), text, &mut m).unwrap();
        let labels = &m.state.namespaces[0].labels;
        assert_eq!(m.state.namespaces[0].name, "n");
        assert_eq!((labels["canary"].as_str(), labels["tier"].as_str(), labels["team"].as_str()), ("yes", "on", "y"));
    }

    #[test]
    fn a_pod_with_a_bad_ip_is_a_warning_not_a_failure() {
        let text = "kind: Pod\nmetadata: {name: p, namespace: n}\nstatus: {podIP: not-an-ip}\n---\nkind: Namespace\nmetadata: {name: n}\n";
        let mut m = Manifests::default();
        parse_into(Path::new("x.yaml"), text, &mut m).unwrap();
        assert!(m.state.pods.is_empty());
        assert_eq!(m.state.namespaces.len(), 1);
        assert!(m.warnings[0].contains("Pod n/p: status.podIP `not-an-ip`"), "{:?}", m.warnings);
    }

    #[test]
    fn an_object_defined_twice_is_the_later_one_and_is_warned_about_naming_both() {
        let mut m = Manifests::default();
        parse_into(Path::new("base.yaml"), LAB, &mut m).unwrap();
        let again = "kind: NetworkPolicy\nmetadata: {name: deny, namespace: production}\nspec: {podSelector: {matchLabels: {app: api}}}\n---\nkind: Pod\nmetadata: {name: api, namespace: production, labels: {app: api, v: \"2\"}}\nstatus: {podIP: 10.0.0.3}\n";
        parse_into(Path::new("overlay.yaml"), again, &mut m).unwrap();
        assert_eq!(m.state.policies.len(), 1, "one policy of that name, as in the cluster");
        assert!(
            m.state.policies[0]
                .spec
                .as_ref()
                .unwrap()
                .pod_selector
                .as_ref()
                .and_then(|s| s.match_labels.as_ref())
                .is_some(),
            "the later one"
        );
        assert_eq!(m.state.pods.len(), 1);
        assert_eq!(m.state.pods[0].ips, vec!["10.0.0.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(m.objects.iter().filter(|o| matches!(o, Object::NetworkPolicy(_))).count(), 1);
        assert_eq!(
            m.warnings,
            vec![
                "NetworkPolicy production/deny is defined twice, in base.yaml: document 2 and in overlay.yaml: document 1; the latter is used",
                "Pod production/api is defined twice, in base.yaml: document 2 and in overlay.yaml: document 2; the latter is used",
            ]
        );
    }
}
