//! `netiso run`: the node daemon's arguments; [`crate::daemon`] runs it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::signal::unix::SignalKind;

use super::LogFormat;
use crate::daemon::{self, Config, TlsFiles};
use crate::datapath::DatapathConfig;
use crate::export::auth::ApiAuth;
use crate::export::log;
use crate::export::trust;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Also observe interfaces matching this name or glob (every veth is observed by default).
    #[arg(long = "interfaces", value_name = "GLOB")]
    pub interfaces: Vec<String>,
    /// Output format of records (stdout) and diagnostics (stderr).
    #[arg(long, value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Drop reasons to record: kernel names (NETFILTER_DROP), classes (policy, socket, routing,
    /// other, routine), `default` (all but routine frees) or `all`; comma-separated.
    #[arg(long, default_value = "default")]
    pub drop_reasons: String,
    /// Entries of the kernel's drop map, shared by the CPUs (about 160 bytes each): a scan needs
    /// one per port it tries within two drain intervals.
    #[arg(long, default_value_t = 32_768)]
    pub drop_map_entries: u32,
    /// Entries of the kernel's flow map.
    #[arg(long, default_value_t = 65_536)]
    pub flow_map_entries: u32,
    /// How often the kernel maps are read.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub drain_interval: Duration,
    /// Keys idle this long leave the kernel maps (while a map is more than half full, keys idle for
    /// two drain intervals).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Take the inventory from these manifests (file or directory, reloaded on change) instead
    /// of the Kubernetes API.
    #[arg(long, value_name = "PATH")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes API (default: in-cluster config, then KUBECONFIG).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, as in the Node object.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The evidence store.
    #[arg(long, default_value = "/var/lib/netiso/evidence.redb")]
    pub store: PathBuf,
    /// Keep evidence this long.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// Keep at most this many bytes of evidence (e.g. 512MiB, 2GiB): each write removes the oldest
    /// records beyond it.
    #[arg(long, default_value = "512MiB", value_parser = parse_bytes)]
    pub store_max_bytes: u64,
    /// Address of the query API (/v1/...).
    #[arg(long, default_value = "127.0.0.1:9963")]
    pub listen: std::net::SocketAddr,
    /// Address of /metrics, /healthz and /readyz (never behind credentials, for Prometheus and
    /// probes).
    #[arg(long, default_value = "127.0.0.1:9962")]
    pub metrics_listen: std::net::SocketAddr,
    /// Authentication of query API requests: `kubernetes` checks bearer tokens with TokenReview
    /// and requires `get nodes/proxy` on this node (SubjectAccessReview); `none` trusts every
    /// caller (only sensible on loopback).
    #[arg(long, value_enum, default_value = "none")]
    pub api_auth: ApiAuth,
    /// How long an authentication/authorization decision is reused.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub auth_cache_ttl: Duration,
    /// TLS certificate (PEM, chain) of the API; reloaded when it changes. With --api-auth
    /// kubernetes and no certificate, one is generated at start.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Publish the generated certificate's CA under this node's name in a ConfigMap (NAME in the
    /// pod's namespace, or NAMESPACE/NAME), where `netiso observe --kube` finds it to verify this
    /// daemon. The ConfigMap must exist; netiso needs get and patch on it.
    #[arg(long, value_name = "CONFIGMAP")]
    pub publish_api_ca: Option<trust::Target>,
    /// A connection to either listener must finish its TLS handshake, and send each request's
    /// headers (also when idle between requests), within this; responses are not limited.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub connection_timeout: Duration,
    /// A dropped conversation's attempts from fresh source ports within this interval of its first
    /// are one record (counting them) and one log line; log at most 10 blocked flows per source
    /// and interval (a scan's other ports are counted in its next line). 0s: every attempt is a
    /// record and a line of its own.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub blocked_log_interval: Duration,
}

/// `512MiB`, `2GiB`, `100MB`, `4096`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("`{text}` is not a size like 512MiB"))?;
    let factor = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("unknown size unit `{other}`; use B, KiB, MiB, GiB, KB, MB or GB")),
    };
    number.checked_mul(factor).ok_or_else(|| format!("`{text}` is too large"))
}

impl RunArgs {
    fn config(self) -> Config {
        let node_name = self.node_name.unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "node".into())
        });
        Config {
            datapath: DatapathConfig {
                interface_patterns: self.interfaces,
                drop_reasons: self.drop_reasons,
                drop_map_entries: self.drop_map_entries,
                flow_map_entries: self.flow_map_entries,
                drain_interval: self.drain_interval,
                idle_timeout: self.idle_timeout,
            },
            print_records: Some(self.log_format),
            manifests: self.manifests,
            kubeconfig: self.kubeconfig,
            node_name,
            store: self.store,
            retention: self.retention,
            store_max_bytes: self.store_max_bytes,
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            api_auth: self.api_auth,
            auth_cache_ttl: self.auth_cache_ttl,
            tls: self.tls_cert.zip(self.tls_key).map(|(cert, key)| TlsFiles { cert, key }),
            connection_timeout: self.connection_timeout,
            blocked_log_interval: self.blocked_log_interval,
            publish_api_ca: self.publish_api_ca,
        }
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    log::init_diagnostics(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate()).context("handling SIGTERM")?;
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = sigterm.recv() => {}
            }
        };
        daemon::run(args.config(), shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("100MB"), Ok(100_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("12 parsecs").is_err());
    }
}
