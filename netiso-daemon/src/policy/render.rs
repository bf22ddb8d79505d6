//! Text form of an explanation: reads like evidence, one fact per line.

use std::fmt::Write;

use super::engine::Verdict;
use super::explain::{DirectionReport, EndpointView, Explanation};

fn endpoint(view: &EndpointView) -> String {
    match (&view.namespace, &view.pod, view.ip) {
        (Some(ns), Some(pod), Some(ip)) => format!("{ns}/{pod} ({ip})"),
        (Some(ns), Some(pod), None) => format!("{ns}/{pod}"),
        (_, _, Some(ip)) => format!("{ip} (not a pod)"),
        _ => "?".into(),
    }
}

fn verdict(v: Verdict) -> &'static str {
    match v {
        Verdict::Allowed => "ALLOWED",
        Verdict::Denied => "DENIED",
    }
}

fn direction(out: &mut String, report: &DirectionReport) {
    let _ = writeln!(
        out,
        "\n{} {}: {}",
        report.direction.as_str(),
        report.subject.as_deref().unwrap_or("(not a pod)"),
        verdict(report.verdict)
    );
    let _ = writeln!(out, "  {}", report.summary);
    if report.isolated {
        let names: Vec<String> = report
            .isolating_policies
            .iter()
            .map(|p| match &p.resource_version {
                Some(rv) => format!("{p} (resourceVersion {rv})"),
                None => p.to_string(),
            })
            .collect();
        let _ = writeln!(out, "  isolated by: {}", names.join(", "));
    }
    for rule in &report.allowed_by {
        let mut detail = format!("  allowed by {} rule {}", rule.policy, rule.rule);
        if let Some(peer) = rule.peer {
            let _ = write!(detail, ", peer {peer}");
        }
        if let Some(port) = rule.port {
            let _ = write!(detail, ", port {port}");
        }
        let _ = writeln!(out, "{detail}");
    }
    for miss in &report.nearest_misses {
        let _ = writeln!(out, "  nearest miss: {}", miss.summary);
    }
}

pub fn text(explanation: &Explanation) -> String {
    let mut out = String::new();
    let flow = &explanation.flow;
    let _ = writeln!(
        out,
        "{}  {} -> {} {}/{}",
        verdict(explanation.verdict),
        endpoint(&flow.from),
        endpoint(&flow.to),
        flow.protocol,
        flow.port
    );
    direction(&mut out, &explanation.egress);
    direction(&mut out, &explanation.ingress);
    if let Some(s) = &explanation.suggestion {
        let _ = writeln!(
            out,
            "\nsuggested minimal policy ({}):",
            if s.verified { "checked: it allows exactly this flow" } else { "NOT confirmed by the engine" }
        );
        for note in &s.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        for line in s.yaml.lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}
