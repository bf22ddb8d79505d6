//! Records on stdout (one JSON object per line, or text) and diagnostics on stderr via tracing.

use std::io::Write;

use crate::cli::LogFormat;
use crate::datapath::{DatapathRecord, EventKind};

pub fn init_diagnostics(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NETISO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

pub struct RecordWriter {
    format: LogFormat,
}

impl RecordWriter {
    pub fn new(format: LogFormat) -> Self {
        RecordWriter { format }
    }

    pub fn write(&self, out: &mut impl Write, record: &DatapathRecord) -> std::io::Result<()> {
        match self.format {
            LogFormat::Json => {
                serde_json::to_writer(&mut *out, record)?;
                writeln!(out)
            }
            LogFormat::Text => writeln!(out, "{}", text_line(record)),
        }
    }
}

fn endpoint(ip: std::net::IpAddr, port: u16) -> String {
    match ip {
        std::net::IpAddr::V6(_) => format!("[{ip}]:{port}"),
        std::net::IpAddr::V4(_) => format!("{ip}:{port}"),
    }
}

/// One human-readable line, in the spirit of `hubble observe -o compact`.
pub fn text_line(r: &DatapathRecord) -> String {
    let time = humantime::format_rfc3339_millis(r.time);
    let flow = format!("{} -> {} {}", endpoint(r.src_ip, r.src_port), endpoint(r.dst_ip, r.dst_port), r.protocol);
    let iface = r.interface.clone().unwrap_or_else(|| format!("if{}", r.ifindex));
    match r.event {
        EventKind::Drop => format!(
            "{time} DROPPED {flow} reason={} at {} on {iface} ({} pkts)",
            r.reason.as_deref().unwrap_or("?"),
            r.location.as_deref().unwrap_or("?"),
            r.packets
        ),
        EventKind::Flow => format!("{time} FORWARDED {flow} on {iface} ({} pkts, {} bytes)", r.packets, r.bytes),
    }
}
