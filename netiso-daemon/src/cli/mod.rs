//! The `netiso` command line: the daemon (`run`) and the responder commands.

mod client;
mod explain;
mod filters;
mod lines;
mod observe;
mod run;
mod top;
mod whatif;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "netiso",
    version,
    about = "Per-node eBPF flow observer that names the NetworkPolicy behind every drop"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the eBPF programs, observe drops and flows, and report them.
    Run(Box<run::RunArgs>),
    /// Decide a flow against NetworkPolicy manifests and explain the verdict.
    Explain(explain::ExplainArgs),
    /// Show recorded flows, like `hubble observe`: what was blocked, where, and by which policy.
    Observe(Box<observe::ObserveArgs>),
    /// What is blocked right now: the conversations, namespaces, pods, ports and policies with
    /// the most blocked attempts over a window, from every server.
    Top(Box<top::TopArgs>),
    /// Who talks to whom: workloads and the ports between them, forwarded and blocked, as a
    /// table, Graphviz DOT or a Mermaid flowchart.
    Graph(Box<top::GraphArgs>),
    /// The evidence bundle of one flow record.
    Evidence(observe::EvidenceArgs),
    /// Replay recorded traffic against proposed NetworkPolicies: what would become denied.
    Whatif(whatif::WhatIfArgs),
    /// Propose the minimal allow policies that keep a namespace's recorded traffic working under
    /// a default deny, checked against that traffic.
    Advise(whatif::AdviseArgs),
}

pub use crate::export::log::LogFormat;

/// The command line, with what clap's derive cannot see: which filters `observe --not` negates
/// (it depends on the order of the arguments).
pub fn parse() -> Cli {
    parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
}

pub fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = Cli::command().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    let filters = match &mut cli.command {
        Command::Observe(args) => Some(&mut args.filters),
        Command::Top(args) => Some(&mut args.span.filters),
        Command::Graph(args) => Some(&mut args.span.filters),
        _ => None,
    };
    if let (Some(filters), Some((name, sub))) = (filters, matches.subcommand()) {
        filters.negated = filters::negated(sub).map_err(|e| {
            let mut command = Cli::command();
            command.build();
            let sub = command.find_subcommand_mut(name).expect("a subcommand it parsed");
            sub.error(clap::error::ErrorKind::ArgumentConflict, e)
        })?;
    }
    Ok(cli)
}

pub fn main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Explain(args) => explain::explain(args),
        Command::Observe(args) => observe::observe(*args),
        Command::Top(args) => top::top(*args),
        Command::Graph(args) => top::graph(*args),
        Command::Evidence(args) => observe::evidence(args),
        Command::Whatif(args) => whatif::whatif(args),
        Command::Advise(args) => whatif::advise(args),
    }
}
