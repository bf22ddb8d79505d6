//! `netiso explain`: decide flows against manifests and say why.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::inventory::manifests;
use crate::policy::suggest::explain_with_suggestion;
use crate::policy::{EndpointRef, Explanation, Flow, PolicyEngine, PolicyError, Protocol, render};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// A YAML/JSON file or a directory of them with Namespaces, Pods and NetworkPolicies.
    #[arg(long, value_name = "PATH")]
    pub manifests: PathBuf,
    /// Source: namespace/pod or an IP address.
    #[arg(long, required_unless_present = "traffic", requires_all = ["to", "port"])]
    pub from: Option<EndpointRef>,
    /// Destination: namespace/pod or an IP address.
    #[arg(long)]
    pub to: Option<EndpointRef>,
    /// Destination port.
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long, default_value = "TCP")]
    pub protocol: Protocol,
    /// Decide many flows: JSON Lines `{"from": ..., "to": ..., "port": 80, "protocol": "TCP"}`
    /// from FILE, or `-` for stdin. Writes one JSON object per input line.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["from", "to", "port"])]
    pub traffic: Option<String>,
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: Output,
}

/// A batch line: `from`/`to` are "ns/pod", an IP string, or `{"ip": "..."}`.
#[derive(Deserialize)]
struct TrafficLine {
    from: LineEndpoint,
    to: LineEndpoint,
    port: u16,
    #[serde(default = "tcp")]
    protocol: Protocol,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LineEndpoint {
    Text(String),
    Ip { ip: std::net::IpAddr },
}

impl LineEndpoint {
    fn resolve(self) -> Result<EndpointRef, String> {
        match self {
            LineEndpoint::Text(s) => s.parse(),
            LineEndpoint::Ip { ip } => Ok(EndpointRef::Ip(ip)),
        }
    }
}

#[derive(Serialize)]
struct Answer<'a> {
    #[serde(flatten)]
    explanation: &'a Explanation,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    policy_errors: Vec<&'a PolicyError>,
}

/// Policy errors that concern the namespaces a flow touches.
fn relevant<'a>(engine: &'a PolicyEngine, x: &Explanation) -> Vec<&'a PolicyError> {
    let namespaces = [&x.flow.from.namespace, &x.flow.to.namespace];
    engine
        .errors()
        .iter()
        .filter(|e| namespaces.iter().any(|ns| ns.as_deref().is_some_and(|ns| e.policy.starts_with(&format!("{ns}/")))))
        .collect()
}

pub fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let loaded = manifests::load(&args.manifests)
        .with_context(|| format!("reading manifests from {}", args.manifests.display()))?;
    for warning in &loaded.warnings {
        eprintln!("netiso: warning: {warning}");
    }
    let engine = PolicyEngine::new(loaded.state);
    for error in engine.errors() {
        eprintln!("netiso: warning: {error}");
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.traffic {
        Some(source) => batch(&engine, &source, &mut out)?,
        None => {
            let flow = Flow {
                from: args.from.context("--from is required")?,
                to: args.to.context("--to is required")?,
                port: args.port.context("--port is required")?,
                protocol: args.protocol,
            };
            let x = explain_with_suggestion(&engine, &flow)?;
            match args.output {
                Output::Text => {
                    write!(out, "{}", render::text(&x))?;
                    for e in relevant(&engine, &x) {
                        writeln!(out, "\nwarning: {e}")?;
                    }
                }
                Output::Json => {
                    serde_json::to_writer_pretty(
                        &mut out,
                        &Answer { policy_errors: relevant(&engine, &x), explanation: &x },
                    )?;
                    writeln!(out)?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn batch(engine: &PolicyEngine, source: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let reader: Box<dyn BufRead> = if source == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(source).with_context(|| format!("opening traffic file {source}"))?,
        ))
    };
    for (index, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading traffic line {}", index + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let result = serde_json::from_str::<TrafficLine>(&line)
            .map_err(|e| format!("not a traffic line: {e}"))
            .and_then(|t| Ok(Flow { from: t.from.resolve()?, to: t.to.resolve()?, port: t.port, protocol: t.protocol }))
            .and_then(|flow| explain_with_suggestion(engine, &flow).map_err(|e| e.to_string()));
        match result {
            Ok(x) => {
                serde_json::to_writer(&mut *out, &Answer { policy_errors: relevant(engine, &x), explanation: &x })?
            }
            Err(error) => serde_json::to_writer(&mut *out, &serde_json::json!({"line": index + 1, "error": error}))?,
        }
        writeln!(out)?;
    }
    Ok(())
}
