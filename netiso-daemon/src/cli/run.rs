//! `netiso run`: the node daemon.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::sync::{mpsc, watch};

use super::LogFormat;
use crate::datapath::{Datapath, DatapathConfig};
use crate::export::log::{self, RecordWriter};

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
    /// Entries of the kernel's drop map.
    #[arg(long, default_value_t = 16_384)]
    pub drop_map_entries: u32,
    /// Entries of the kernel's flow map.
    #[arg(long, default_value_t = 65_536)]
    pub flow_map_entries: u32,
    /// How often the kernel maps are read.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub drain_interval: Duration,
    /// Keys idle this long leave the kernel maps.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    log::init_diagnostics(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = DatapathConfig {
        interface_patterns: args.interfaces.clone(),
        drop_reasons: args.drop_reasons.clone(),
        drop_map_entries: args.drop_map_entries,
        flow_map_entries: args.flow_map_entries,
        drain_interval: args.drain_interval,
        idle_timeout: args.idle_timeout,
    };
    let datapath = Datapath::load(config).await?;
    let stats = datapath.stats();
    let (records_tx, mut records_rx) = mpsc::channel(4096);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut datapath_task = tokio::spawn(datapath.run(records_tx, shutdown_rx, Some(ready_tx)));

    let writer = RecordWriter::new(args.log_format);
    let mut stdout = std::io::stdout();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut ready_rx = Some(ready_rx);
    let result = loop {
        tokio::select! {
            ready = async { ready_rx.as_mut().expect("ready once").await }, if ready_rx.is_some() => {
                ready_rx = None;
                if let Ok(interfaces) = ready {
                    tracing::info!(interfaces = ?interfaces, "datapath ready");
                }
            }
            record = records_rx.recv() => match record {
                Some(record) if record.new_key => {
                    writer.write(&mut stdout, &record)?;
                    stdout.flush()?;
                }
                Some(_) => {}
                None => break Ok(()),
            },
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
            finished = &mut datapath_task => break finished.context("datapath task")?.map_err(anyhow::Error::from),
        }
    };
    // Stop the datapath, print what its final drain produced, then let it detach.
    let _ = shutdown_tx.send(true);
    if !datapath_task.is_finished() {
        let drain = async {
            while let Some(record) = records_rx.recv().await {
                if record.new_key {
                    writer.write(&mut stdout, &record)?;
                }
            }
            anyhow::Ok(())
        };
        let (done, drained) = tokio::join!(datapath_task, drain);
        drained?;
        done.context("datapath task")??;
    }
    result?;
    let stats = stats.lock().expect("stats lock").clone();
    tracing::info!(
        records = stats.records,
        ring_events = stats.ring_events,
        dropped_packets = stats.dropped_packets,
        flow_packets = stats.flow_packets,
        losses = stats.losses(),
        ringbuf_full = stats.ringbuf_full,
        drop_map_full = stats.drop_map_full,
        flow_map_full = stats.flow_map_full,
        "stopped; all programs detached"
    );
    Ok(ExitCode::SUCCESS)
}
