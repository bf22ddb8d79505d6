//! The `netiso` command line: the daemon (`run`) and the responder commands.

mod client;
mod explain;
mod observe;
mod run;
mod whatif;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Run(run::RunArgs),
    /// Decide a flow against NetworkPolicy manifests and explain the verdict.
    Explain(explain::ExplainArgs),
    /// Show recorded flows, like `hubble observe`: what was blocked, where, and by which policy.
    Observe(observe::ObserveArgs),
    /// The evidence bundle of one flow record.
    Evidence(observe::EvidenceArgs),
    /// Replay recorded traffic against proposed NetworkPolicies: what would become denied.
    Whatif(whatif::WhatIfArgs),
    /// Propose the minimal allow policies that keep a namespace's recorded traffic working under
    /// a default deny, checked against that traffic.
    Advise(whatif::AdviseArgs),
}

pub use crate::export::log::LogFormat;

pub fn main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Explain(args) => explain::explain(args),
        Command::Observe(args) => observe::observe(args),
        Command::Evidence(args) => observe::evidence(args),
        Command::Whatif(args) => whatif::whatif(args),
        Command::Advise(args) => whatif::advise(args),
    }
}
