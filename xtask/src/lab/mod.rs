//! The local lab: a Kubernetes node in network namespaces. Pods hang off a bridge in the "node"
//! namespace, which enforces their NetworkPolicies with nftables in the forward path (as
//! iptables/nftables CNIs do), translates Services kube-proxy style, masquerades pod egress, and
//! routes it through a lab router (which masquerades again, as a cloud NAT) to a "world"
//! namespace. Nothing routes to the machine's own uplink. netiso runs in the node namespace and
//! sees traffic exactly as on a Kubernetes node.

pub mod kube_proxy;
pub mod scenario;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use netiso::inventory::manifests;
use netiso::policy::{EndpointRef, Flow, PolicyEngine, Protocol, Verdict};

use crate::nft::Enforcement;
use crate::probe::Outcome;
use crate::{nft, probe, sh};
use scenario::{LabPod, LabService, PODS, Server};

pub const NFT_TABLE: &str = "netiso_lab";

/// The repository root (for deploy/network-policies).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the repository").to_path_buf()
}

/// The course baseline from deploy/network-policies/base, instantiated for each app namespace as
/// the per-namespace kustomize overlays do.
pub fn baseline_policies() -> anyhow::Result<Vec<NetworkPolicy>> {
    let base = repo_root().join("deploy/network-policies/base");
    let loaded = manifests::load(&base)?;
    let mut out = Vec::new();
    for ns in scenario::APP_NAMESPACES {
        for p in &loaded.state.policies {
            let mut p = p.clone();
            p.metadata.namespace = Some(ns.into());
            out.push(p);
        }
    }
    Ok(out)
}

/// Reads NetworkPolicies from a file or directory of manifests.
pub fn policies_from(path: &Path) -> anyhow::Result<Vec<NetworkPolicy>> {
    Ok(manifests::load(path)?.state.policies)
}

pub struct Lab {
    pub id: String,
    pub out_dir: PathBuf,
    /// An executable with the `lab-serve` subcommand (the xtask binary).
    helper: PathBuf,
    enforcement: Enforcement,
    kube_proxy: kube_proxy::Mode,
}

impl Lab {
    pub fn new(id: &str, out_dir: &Path, helper: &Path) -> Self {
        Lab {
            id: id.into(),
            out_dir: out_dir.into(),
            helper: helper.into(),
            enforcement: Enforcement::default(),
            kube_proxy: kube_proxy::Mode::default(),
        }
    }

    /// What the node's enforcement does to packets no policy admits.
    pub fn with_enforcement(mut self, enforcement: Enforcement) -> Self {
        self.enforcement = enforcement;
        self
    }

    /// How the node's kube-proxy translates Services.
    pub fn with_kube_proxy(mut self, mode: kube_proxy::Mode) -> Self {
        self.kube_proxy = mode;
        self
    }

    /// The enforcement this lab was last brought up with (so `apply` keeps it), else the default.
    pub fn with_recorded_enforcement(self) -> Self {
        use clap::ValueEnum;
        let recorded = std::fs::read_to_string(self.enforcement_path()).ok();
        match recorded.and_then(|name| Enforcement::from_str(name.trim(), false).ok()) {
            Some(enforcement) => self.with_enforcement(enforcement),
            None => self,
        }
    }

    fn enforcement_path(&self) -> PathBuf {
        self.out_dir.join("enforcement")
    }

    fn prefix(&self) -> String {
        format!("{}{}-", crate::leftovers::PREFIX, self.id)
    }

    /// The network namespace that plays the Kubernetes node: bridge, nftables, netiso.
    pub fn node_ns(&self) -> String {
        format!("{}node", self.prefix())
    }

    /// The namespace of node `index` of [`scenario::NODES`]: the first is [`Lab::node_ns`].
    pub fn node_ns_at(&self, index: usize) -> String {
        match index {
            0 => self.node_ns(),
            i => format!("{}node{}", self.prefix(), i + 1),
        }
    }

    pub fn pod_ns(&self, pod: &LabPod) -> String {
        format!("{}{}-{}", self.prefix(), pod.namespace, pod.name)
    }

    /// The lab router between the node's uplink and the world.
    pub fn router_ns(&self) -> String {
        format!("{}router", self.prefix())
    }

    /// The "world" beyond the node: one server at [`scenario::WORLD_IP`].
    pub fn world_ns(&self) -> String {
        format!("{}world", self.prefix())
    }

    /// The namespace traffic from `end` starts in: a pod's own, or the node's.
    fn source_ns(&self, end: End) -> anyhow::Result<String> {
        match end {
            End::Pod(pod) => Ok(self.pod_ns(pod)),
            End::Node => Ok(self.node_ns()),
            End::World => Ok(self.world_ns()),
            End::Service(service) => bail!("a Service ({}) sends nothing of its own", service.key()),
        }
    }

    pub fn manifests_path(&self) -> PathBuf {
        self.out_dir.join("cluster.yaml")
    }

    pub fn store_path(&self) -> PathBuf {
        self.out_dir.join("evidence.redb")
    }

    /// Starts `netiso run` in the node namespace with the lab's manifests as its inventory, its
    /// API on 127.0.0.1:9963 and its metrics on 127.0.0.1:9962 of that namespace.
    pub fn observe(&self, netiso: &Path, extra_args: &[&str]) -> anyhow::Result<netiso::daemon::process::Process> {
        self.observe_as(netiso, "lab", "127.0.0.1:9963", "127.0.0.1:9962", extra_args)
    }

    /// As [`Lab::observe`], as node `name` with its own store and API address, so that several
    /// daemons can watch the same lab.
    pub fn observe_as(
        &self,
        netiso: &Path,
        name: &str,
        listen: &str,
        metrics_listen: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<netiso::daemon::process::Process> {
        let manifests = self.manifests_path();
        let manifests = manifests.to_str().context("manifests path is not UTF-8")?;
        let mut args =
            vec!["--manifests", manifests, "--node-name", name, "--listen", listen, "--metrics-listen", metrics_listen];
        args.extend_from_slice(extra_args);
        let store = if name == "lab" { self.store_path() } else { self.out_dir.join(format!("evidence-{name}.redb")) };
        netiso::daemon::process::Process::start(netiso, &self.node_ns(), &store, &args)
    }

    /// One probe from a lab pod: whether it got through.
    pub fn probe_from(&self, pod: &str, kind: ProbeKind, target: SocketAddr, source_port: u16) -> bool {
        self.probe_in(&self.pod_ns(scenario::pod(pod)), kind, target, source_port) == Outcome::Through
    }

    fn probe_in(&self, netns: &str, kind: ProbeKind, target: SocketAddr, source_port: u16) -> Outcome {
        let args = [kind.command(), &target.to_string(), "--source-port", &source_port.to_string()];
        self.helper_status(netns, &args).and_then(|s| s.code()).map_or(Outcome::NoAnswer, Outcome::from_exit_code)
    }

    /// A command inside the node namespace (netiso's CLI, ...): its output.
    pub fn in_node_output(&self, program: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.node_ns()])
            .arg(program)
            .args(args)
            .output()
            .with_context(|| format!("running {} in the node namespace", program.display()))
    }

    /// Builds the scenario from scratch (removing any earlier instance with the same id, and its
    /// files: manifests, logs, evidence).
    pub fn up(&self, policies: &[NetworkPolicy]) -> anyhow::Result<()> {
        self.down()?;
        if self.out_dir.exists() {
            std::fs::remove_dir_all(&self.out_dir).with_context(|| format!("removing {}", self.out_dir.display()))?;
        }
        std::fs::create_dir_all(&self.out_dir).with_context(|| format!("creating {}", self.out_dir.display()))?;
        if let Some(name) = clap::ValueEnum::to_possible_value(&self.enforcement) {
            std::fs::write(self.enforcement_path(), name.get_name())?;
        }
        let result = self.build(policies);
        if result.is_err() {
            let _ = self.down();
        }
        result
    }

    fn build(&self, policies: &[NetworkPolicy]) -> anyhow::Result<()> {
        // Bridged traffic must traverse the IP forward hook, where the policies are enforced. The
        // knobs come with br_netfilter, a module on distribution kernels (kube-proxy loads it too).
        if !Path::new("/proc/sys/net/bridge").exists() {
            sh::run("modprobe", &["br_netfilter"]).context("the lab needs the br_netfilter module")?;
        }
        for (index, lab_node) in scenario::NODES.iter().enumerate() {
            let node = self.node_ns_at(index);
            sh::ip(&["netns", "add", &node])?;
            sh::ip(&["-n", &node, "link", "set", "lo", "up"])?;
            sh::ip(&["-n", &node, "link", "add", "br0", "type", "bridge"])?;
            sh::ip(&["-n", &node, "addr", "add", &format!("{}/24", lab_node.gateway_v4()), "dev", "br0"])?;
            sh::ip(&["-n", &node, "addr", "add", &format!("{}/64", lab_node.gateway_v6()), "dev", "br0", "nodad"])?;
            sh::ip(&["-n", &node, "link", "set", "br0", "up"])?;
            for knob in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
                sh::run("ip", &["netns", "exec", &node, "sysctl", "-qw", &format!("net.bridge.{knob}=1")])?;
            }
        }
        for pod in PODS {
            let (ns, node) = (self.pod_ns(pod), self.node_ns_at(pod.node));
            sh::ip(&["netns", "add", &ns])?;
            sh::ip(&["-n", &node, "link", "add", &pod.veth(), "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            sh::ip(&["-n", &node, "link", "set", &pod.veth(), "master", "br0", "up"])?;
            sh::ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            sh::ip(&["-n", &ns, "addr", "add", &format!("{}/24", pod.ipv4()), "dev", "eth0"])?;
            sh::ip(&["-n", &ns, "addr", "add", &format!("{}/64", pod.ipv6()), "dev", "eth0", "nodad"])?;
            sh::ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            sh::ip(&["-n", &ns, "route", "add", "default", "via", &pod.node().gateway_v4()])?;
        }
        self.build_uplink()?;
        self.apply_policies(policies)?;
        // kube-proxy on the observed node; the other's pods call no Service.
        let node = self.node_ns();
        match self.kube_proxy {
            kube_proxy::Mode::Nftables => {
                self.nft(&node, "kube-proxy.nft", &kube_proxy::ruleset(scenario::SERVICES))?
            }
            kube_proxy::Mode::Iptables => {
                let path = self.out_dir.join("kube-proxy.iptables");
                std::fs::write(&path, kube_proxy::iptables_rules(scenario::SERVICES))?;
                sh::run("ip", &["netns", "exec", &node, "iptables-restore", &path.to_string_lossy()])?;
            }
        }
        for pod in PODS {
            self.start_server(pod)?;
        }
        self.start_world_server()?;
        self.wait_for_servers()
    }

    /// The nodes' uplinks to one subnet behind the lab router, the router, and the world behind
    /// it. An uplink is a macvlan port of that subnet, not a veth: on a node it is a NIC, which
    /// netiso does not take for a pod's interface. Each node routes the other's pod range to it (as host-gateway CNIs and cloud routes
    /// do), so pods reach pods on another node untranslated. Pod egress leaving the cluster is
    /// masqueraded to the node's address (as CNIs and ip-masq-agent do), then to the router's (as
    /// a cloud NAT does); the world has no route back to either inner network.
    fn build_uplink(&self) -> anyhow::Result<()> {
        let (router, world) = (self.router_ns(), self.world_ns());
        sh::ip(&["netns", "add", &router])?;
        sh::ip(&["netns", "add", &world])?;
        sh::run("ip", &["netns", "exec", &router, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        sh::ip(&["-n", &router, "link", "set", "lo", "up"])?;
        // The subnet: macvlan ports in bridge mode reach each other through their parent, which
        // only needs a carrier (one end of a veth pair whose other end is up too).
        sh::ip(&["-n", &router, "link", "add", "subnet", "type", "veth", "peer", "name", "subnet-end"])?;
        for end in ["subnet", "subnet-end"] {
            sh::ip(&["-n", &router, "link", "set", end, "up"])?;
        }
        let port = |name: &str| {
            sh::ip(&["-n", &router, "link", "add", name, "link", "subnet", "type", "macvlan", "mode", "bridge"])
        };
        port("nodes")?;
        sh::ip(&["-n", &router, "addr", "add", &format!("{}/24", scenario::ROUTER_IP), "dev", "nodes"])?;
        sh::ip(&["-n", &router, "link", "set", "nodes", "up"])?;
        for (index, lab_node) in scenario::NODES.iter().enumerate() {
            let node = self.node_ns_at(index);
            let name = format!("node{}", index + 1);
            sh::run("ip", &["netns", "exec", &node, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            port(&name)?;
            sh::ip(&["-n", &router, "link", "set", &name, "netns", &node])?;
            sh::ip(&["-n", &node, "link", "set", &name, "name", "uplink"])?;
            sh::ip(&["-n", &node, "addr", "add", &format!("{}/24", lab_node.ip), "dev", "uplink"])?;
            sh::ip(&["-n", &node, "link", "set", "uplink", "up"])?;
            sh::ip(&["-n", &node, "route", "add", "default", "via", scenario::ROUTER_IP])?;
            for other in scenario::NODES.iter().filter(|other| other.name != lab_node.name) {
                sh::ip(&["-n", &node, "route", "add", &other.pod_cidr_v4(), "via", other.ip])?;
            }
            let masquerade = format!(
                "table ip pod-egress {{\n\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tip saddr {} ip daddr != {} oifname \"uplink\" masquerade\n\t}}\n}}\n",
                lab_node.pod_cidr_v4(),
                scenario::CLUSTER_CIDR
            );
            self.nft(&node, &format!("pod-egress-{}.nft", lab_node.name), &masquerade)?;
        }
        sh::ip(&["-n", &router, "link", "add", "world", "type", "veth", "peer", "name", "eth0", "netns", &world])?;
        sh::ip(&["-n", &router, "addr", "add", &format!("{}/24", scenario::ROUTER_WORLD_IP), "dev", "world"])?;
        sh::ip(&["-n", &router, "link", "set", "world", "up"])?;
        sh::ip(&["-n", &world, "link", "set", "lo", "up"])?;
        sh::ip(&["-n", &world, "addr", "add", &format!("{}/24", scenario::WORLD_IP), "dev", "eth0"])?;
        sh::ip(&["-n", &world, "link", "set", "eth0", "up"])?;
        let router_masquerade = "table ip cloud-nat {\n\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\toifname \"world\" masquerade\n\t}\n}\n";
        self.nft(&router, "cloud-nat.nft", router_masquerade)
    }

    /// Loads an nftables script (kept in the lab's directory for reading) into namespace `netns`.
    fn nft(&self, netns: &str, file: &str, script: &str) -> anyhow::Result<()> {
        let path = self.out_dir.join(file);
        std::fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
        sh::run("ip", &["netns", "exec", netns, "nft", "-f", &path.to_string_lossy()]).map(drop)
    }

    /// Writes the scenario's manifests with these policies and enforces them in the node.
    pub fn apply_policies(&self, policies: &[NetworkPolicy]) -> anyhow::Result<()> {
        let mut docs = Vec::new();
        for ns in scenario::namespaces() {
            docs.push(serde_saphyr::to_string(&ns)?);
        }
        for pod in scenario::pods() {
            docs.push(serde_saphyr::to_string(&pod)?);
        }
        for service in scenario::services() {
            docs.push(serde_saphyr::to_string(&service)?);
        }
        for node in scenario::nodes() {
            docs.push(serde_saphyr::to_string(&node)?);
        }
        // A resourceVersion per apply, as the API server would give, so evidence can cite it.
        let version = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .to_string();
        for policy in policies {
            let mut policy = policy.clone();
            policy.metadata.resource_version = Some(version.clone());
            docs.push(serde_saphyr::to_string(&policy)?);
        }
        let manifests = self.manifests_path();
        std::fs::write(&manifests, docs.join("---\n")).with_context(|| format!("writing {}", manifests.display()))?;
        let engine = self.engine()?;
        if let Some(error) = engine.errors().first() {
            bail!("the lab's policies are invalid: {error}");
        }
        let ruleset = nft::ruleset(NFT_TABLE, &engine, self.enforcement);
        // Replace the table atomically: delete (if present) and add in one transaction.
        let script = format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n{ruleset}");
        // Every node enforces the policies of the packets it forwards (the rules match pod
        // addresses, so one ruleset serves all).
        for index in 0..scenario::NODES.len() {
            self.nft(&self.node_ns_at(index), "nftables.nft", &script)?;
        }
        Ok(())
    }

    /// The engine over the lab's current manifests.
    pub fn engine(&self) -> anyhow::Result<PolicyEngine> {
        let loaded = manifests::load(&self.manifests_path())?;
        Ok(PolicyEngine::new(loaded.state))
    }

    fn start_server(&self, pod: &LabPod) -> anyhow::Result<()> {
        let ns = self.pod_ns(pod);
        let log = std::fs::File::create(self.out_dir.join(format!("{}-{}.log", pod.namespace, pod.name)))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns]);
        match pod.server {
            Server::None => return Ok(()),
            Server::Echo(port) => {
                cmd.arg(&self.helper).args(["lab-serve", &port.to_string()]);
            }
            Server::Dns => {
                let api = scenario::service("production/api");
                cmd.args([
                    "dnsmasq",
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--user=root",
                    "--pid-file",
                ])
                .arg(format!("--listen-address={},{}", pod.ipv4(), pod.ipv6()))
                .arg(format!("--address=/{}/{}", scenario::API_NAME, api.ip()))
                .arg("--log-facility=-");
            }
        }
        self.spawn_server(cmd, log, &pod.key())
    }

    fn start_world_server(&self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.out_dir.join("world.log"))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.world_ns()])
            .arg(&self.helper)
            .args(["lab-serve", &scenario::WORLD_PORT.to_string()]);
        self.spawn_server(cmd, log, "the world")
    }

    fn spawn_server(&self, mut cmd: Command, log: std::fs::File, what: &str) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt;
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
        cmd.spawn().with_context(|| format!("starting the server of {what}"))?;
        Ok(())
    }

    /// Servers answer from their node (node → pod traffic is not forwarded, so no policy applies).
    fn wait_for_servers(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let until_ready = |what: &str, ready: &dyn Fn() -> bool| -> anyhow::Result<()> {
            while !ready() {
                if Instant::now() > deadline {
                    bail!("the server of {what} did not come up; see {}", self.out_dir.display());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        };
        for pod in PODS {
            until_ready(&pod.key(), &|| match pod.server {
                Server::None => true,
                Server::Echo(port) => self.in_netns(
                    &self.node_ns_at(pod.node),
                    &["probe-tcp", &SocketAddr::new(pod.ipv4(), port).to_string()],
                ),
                Server::Dns => self.in_node(&["probe-dns-udp", &SocketAddr::new(pod.ipv4(), 53).to_string()]),
            })?;
        }
        let world = SocketAddr::new(scenario::WORLD_IP.parse()?, scenario::WORLD_PORT).to_string();
        until_ready("the world", &|| self.in_netns(&self.router_ns(), &["probe-tcp", &world]))?;
        // The observed node reaches the others (their answer, a port unreachable, is enough): a
        // first probe across nodes must not wait for the nodes' subnet to settle.
        for other in &scenario::NODES[1..] {
            let target = SocketAddr::new(other.ip.parse()?, 9).to_string();
            until_ready(other.name, &|| {
                self.probe_in(&self.node_ns(), ProbeKind::Udp, target.parse().expect("valid"), 0) != Outcome::NoAnswer
            })?;
        }
        Ok(())
    }

    fn in_node(&self, args: &[&str]) -> bool {
        self.in_netns(&self.node_ns(), args)
    }

    fn in_netns(&self, ns: &str, args: &[&str]) -> bool {
        self.helper_status(ns, args).is_some_and(|s| s.success())
    }

    /// The helper run with `args` inside namespace `ns`, quietly: how it exited, if it ran.
    fn helper_status(&self, ns: &str, args: &[&str]) -> Option<std::process::ExitStatus> {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&self.helper)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()
    }

    /// Drives the scenario's traffic; each result carries what Kubernetes would do with it under
    /// the lab's current policies.
    pub fn traffic(&self) -> anyhow::Result<Vec<ProbeResult>> {
        self.traffic_of(probes())
    }

    /// Drives these probes; each result carries what Kubernetes would do with it under the lab's
    /// current policies.
    pub fn traffic_of(&self, probes: Vec<Probe>) -> anyhow::Result<Vec<ProbeResult>> {
        let engine = self.engine()?;
        let results: anyhow::Result<Vec<ProbeResult>> = std::thread::scope(|scope| {
            let handles: Vec<_> = probes
                .into_iter()
                .map(|p| {
                    let engine = &engine;
                    scope.spawn(move || -> anyhow::Result<ProbeResult> {
                        let expected = kubernetes_allows(engine, &p);
                        let target = SocketAddr::new(p.target(), p.port);
                        let outcome = self.probe_in(&self.source_ns(p.from)?, p.kind, target, p.source_port);
                        Ok(ProbeResult { probe: p, expected, observed: outcome == Outcome::Through, outcome })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("probe thread")).collect()
        });
        results
    }

    /// Builds the scenario and returns a guard that tears it down when dropped, also when the
    /// caller fails or panics midway.
    pub fn up_guarded(&self, policies: &[NetworkPolicy]) -> anyhow::Result<LabGuard<'_>> {
        self.up(policies)?;
        Ok(LabGuard { lab: self })
    }

    /// Removes every namespace (and with them every link, nft table and server) of this lab id.
    /// Safe to run at any time, also after a failed `up`.
    pub fn down(&self) -> anyhow::Result<()> {
        let prefix = self.prefix();
        let mine: Vec<String> = sh::netns_list()?.into_iter().filter(|n| n.starts_with(&prefix)).collect();
        for ns in &mine {
            sh::delete_netns(ns)?;
        }
        Ok(())
    }
}

/// Tears the lab down when dropped.
pub struct LabGuard<'a> {
    lab: &'a Lab,
}

impl LabGuard<'_> {
    /// Tears down now and reports failure (dropping the guard only logs it).
    pub fn down(self) -> anyhow::Result<()> {
        let result = self.lab.down();
        std::mem::forget(self);
        result
    }
}

impl Drop for LabGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.lab.down() {
            eprintln!("tearing down lab {}: {e:#}", self.lab.id);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    Tcp,
    Udp,
    DnsUdp,
    DnsTcp,
}

impl ProbeKind {
    fn command(self) -> &'static str {
        match self {
            ProbeKind::Tcp => "probe-tcp",
            ProbeKind::Udp => "probe-udp",
            ProbeKind::DnsUdp => "probe-dns-udp",
            ProbeKind::DnsTcp => "probe-dns-tcp",
        }
    }
}

/// One end of a probe.
#[derive(Clone, Copy)]
pub enum End {
    Pod(&'static LabPod),
    /// The node itself, as the kubelet's probes and hostNetwork pods: from its bridge address.
    Node,
    /// A Service's ClusterIP (IPv4), translated by the node's kube-proxy.
    Service(&'static LabService),
    /// The server beyond the lab router (IPv4).
    World,
}

impl End {
    pub fn key(&self) -> String {
        match self {
            End::Pod(pod) => pod.key(),
            End::Node => "node".into(),
            End::Service(service) => format!("service {}", service.key()),
            End::World => "world".into(),
        }
    }

    pub fn ip(&self, ipv6: bool) -> IpAddr {
        match self {
            End::Pod(pod) if ipv6 => pod.ipv6(),
            End::Pod(pod) => pod.ipv4(),
            End::Node if ipv6 => scenario::GATEWAY_V6.parse().expect("valid"),
            End::Node => scenario::GATEWAY_V4.parse().expect("valid"),
            End::Service(service) => service.ip(),
            End::World => scenario::WORLD_IP.parse().expect("valid"),
        }
    }
}

/// Whether Kubernetes lets this probe through under these policies: traffic from the node always;
/// to a Service, whatever the policies say of its backend on the target port (no endpoints: a
/// reject); otherwise whatever they say of the flow itself.
fn kubernetes_allows(engine: &PolicyEngine, p: &Probe) -> bool {
    let End::Pod(from) = p.from else { return matches!(p.from, End::Node) };
    let (to, port) = match p.to {
        End::Service(service) => {
            match (service.backends().first(), service.target_port(p.port, p.protocol().as_str())) {
                (Some(backend), Some(target)) => (End::Pod(backend).ip(p.ipv6), target),
                _ => return false,
            }
        }
        to => (to.ip(p.ipv6), p.port),
    };
    let flow = Flow {
        from: EndpointRef::Ip(End::Pod(from).ip(p.ipv6)),
        to: EndpointRef::Ip(to),
        port,
        protocol: p.protocol(),
    };
    engine.verdict(&flow).is_ok_and(|v| v == Verdict::Allowed)
}

#[derive(Clone, Copy)]
pub struct Probe {
    pub from: End,
    pub to: End,
    pub ipv6: bool,
    pub port: u16,
    pub kind: ProbeKind,
    /// Fixed so that the flow's 5-tuple is known before it is sent.
    pub source_port: u16,
}

impl Probe {
    /// Whether this probe goes `from` → `to` (keys of [`End`]) with this kind and family.
    pub fn to(&self, from: &str, to: &str, kind: ProbeKind, ipv6: bool) -> bool {
        self.from.key() == from && self.to.key() == to && self.kind == kind && self.ipv6 == ipv6
    }

    pub fn from_ip(&self) -> IpAddr {
        self.from.ip(self.ipv6)
    }

    pub fn target(&self) -> IpAddr {
        self.to.ip(self.ipv6)
    }

    pub fn protocol(&self) -> Protocol {
        match self.kind {
            ProbeKind::Tcp | ProbeKind::DnsTcp => Protocol::Tcp,
            ProbeKind::Udp | ProbeKind::DnsUdp => Protocol::Udp,
        }
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            ProbeKind::DnsUdp | ProbeKind::DnsTcp => "DNS ",
            _ => "",
        };
        write!(
            f,
            "{} -> {}:{} {what}{}{}",
            self.from.key(),
            self.to.key(),
            self.port,
            self.protocol(),
            if self.ipv6 { " (IPv6)" } else { "" }
        )
    }
}

pub struct ProbeResult {
    pub probe: Probe,
    /// Whether Kubernetes lets it through under the lab's policies.
    pub expected: bool,
    /// Whether the traffic got through.
    pub observed: bool,
    /// How it ended, to tell a drop from a reject.
    pub outcome: Outcome,
}

/// The scenario's traffic: DNS from every app pod, ingress to the apps, and cross-namespace
/// attempts the baseline blocks.
pub fn probes() -> Vec<Probe> {
    let p = scenario::pod;
    let probe = |from, to, ipv6, port, kind| Probe {
        from: End::Pod(p(from)),
        to: End::Pod(p(to)),
        ipv6,
        port,
        kind,
        source_port: 0,
    };
    let mut list = Vec::new();
    for from in ["develop/debug", "staging/web", "production/api"] {
        for kind in [ProbeKind::DnsUdp, ProbeKind::DnsTcp] {
            list.push(probe(from, "kube-system/coredns", false, 53, kind));
        }
    }
    list.push(probe("ingress-nginx/controller", "production/api", false, 8080, ProbeKind::Tcp));
    list.push(probe("ingress-nginx/controller", "production/api", true, 8080, ProbeKind::Tcp));
    list.push(probe("ingress-nginx/controller", "staging/web", false, 8080, ProbeKind::Tcp));
    list.push(probe("develop/debug", "production/api", false, 8080, ProbeKind::Tcp));
    list.push(probe("develop/debug", "production/api", true, 8080, ProbeKind::Tcp));
    list.push(probe("develop/debug", "production/api", false, 8080, ProbeKind::Udp));
    list.push(probe("staging/web", "production/api", false, 8080, ProbeKind::Tcp));
    list.push(probe("develop/debug", "staging/web", false, 8080, ProbeKind::Tcp));
    for (i, probe) in list.iter_mut().enumerate() {
        probe.source_port = FIRST_SOURCE_PORT + i as u16;
    }
    list
}

/// What a node adds to the scenario's traffic: names resolved through the kube-dns ClusterIP,
/// Service calls (one to a Service without endpoints), the kubelet's probes from the node, a
/// hostNetwork client of a Service, and egress to the world.
pub fn node_probes() -> Vec<Probe> {
    let pod = |key| End::Pod(scenario::pod(key));
    let service = |key| End::Service(scenario::service(key));
    let probe = |from, to, port, kind| Probe { from, to, ipv6: false, port, kind, source_port: 0 };
    let mut list = Vec::new();
    for from in ["develop/debug", "staging/web", "production/api"] {
        for kind in [ProbeKind::DnsUdp, ProbeKind::DnsTcp] {
            list.push(probe(pod(from), service("kube-system/kube-dns"), 53, kind));
        }
    }
    list.extend([
        probe(pod("ingress-nginx/controller"), service("production/api"), 80, ProbeKind::Tcp),
        probe(pod("ingress-nginx/controller"), service("staging/web"), 80, ProbeKind::Tcp),
        probe(pod("develop/debug"), service("production/api"), 80, ProbeKind::Tcp),
        probe(pod("ingress-nginx/controller"), service("production/payments"), 80, ProbeKind::Tcp),
        probe(End::Node, pod("production/api"), 8080, ProbeKind::Tcp),
        probe(End::Node, pod("staging/web"), 8080, ProbeKind::Tcp),
        probe(End::Node, service("production/api"), 80, ProbeKind::Tcp),
        probe(pod("ingress-nginx/controller"), End::World, scenario::WORLD_PORT, ProbeKind::Tcp),
        probe(pod("ingress-nginx/controller"), End::World, scenario::WORLD_PORT, ProbeKind::Udp),
        probe(pod("develop/debug"), End::World, scenario::WORLD_PORT, ProbeKind::Tcp),
        probe(pod("ingress-nginx/controller"), service("staging/docs"), 80, ProbeKind::Tcp),
        probe(pod("develop/debug"), service("staging/docs"), 80, ProbeKind::Tcp),
    ]);
    for (i, probe) in list.iter_mut().enumerate() {
        probe.source_port = FIRST_NODE_SOURCE_PORT + i as u16;
    }
    list
}

/// The scenario's traffic and what a node adds to it.
pub fn all_probes() -> Vec<Probe> {
    probes().into_iter().chain(node_probes()).collect()
}

/// The traffic the course means to keep: DNS from the app pods and ingress-nginx to the apps.
pub fn legitimate_probes() -> Vec<Probe> {
    probes()
        .into_iter()
        .filter(|p| p.to.key() == "kube-system/coredns" || p.from.key() == "ingress-nginx/controller")
        .collect()
}

/// A lab id unique across tests and concurrent runs, short enough for namespace names.
/// A test's lab, with an id of its own and an output directory that goes when the test passes
/// (and stays, named on standard error, when it fails: it holds the lab's logs).
pub fn for_test(prefix: &str, helper: &Path) -> (Lab, Scratch) {
    let id = unique_id(prefix);
    let out = std::env::temp_dir().join(format!("netiso-lab-{id}"));
    (Lab::new(&id, &out, helper), Scratch(out))
}

/// A directory removed on drop unless the thread is panicking.
pub struct Scratch(pub PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("lab output kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn unique_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let sequence = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{prefix}{}{}{sequence}", std::process::id() % 10000, nanos % 1000)
}

/// Probes send from FIRST_SOURCE_PORT + their index in [`probes`].
pub const FIRST_SOURCE_PORT: u16 = 40000;
/// ... and from FIRST_NODE_SOURCE_PORT + their index in [`node_probes`].
pub const FIRST_NODE_SOURCE_PORT: u16 = 40100;

/// Runs a probe subcommand of the helper (inside a pod's namespace): exit status 0 = got through.
pub fn run_probe(kind: &str, addr: &str, source_port: u16) -> anyhow::Result<Outcome> {
    let addr: SocketAddr = addr.parse().with_context(|| format!("`{addr}` is not ip:port"))?;
    let timeout = Duration::from_millis(1000);
    Ok(match kind {
        "probe-tcp" => probe::tcp(addr, source_port, timeout),
        "probe-udp" => probe::udp(addr, source_port, timeout),
        "probe-dns-udp" => probe::dns_outcome(addr, source_port, scenario::API_NAME, false, timeout),
        "probe-dns-tcp" => probe::dns_outcome(addr, source_port, scenario::API_NAME, true, timeout),
        other => bail!("unknown probe {other}"),
    })
}
