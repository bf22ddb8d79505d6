//! How flows read to people: compact lines near `hubble observe`'s, tables, dicts, and an
//! evidence bundle as text. Verdicts and drop reasons in words, the kernel's names beside them.

use std::fmt::Write as _;
use std::time::SystemTime;

use clap::ValueEnum;

use crate::cluster::{EndpointKind, Identity};
use crate::datapath::reasons::describe;
use crate::evidence::record::{Attribution, EvidenceBundle, FlowRecord, FlowVerdict};
use crate::policy::Labels;

/// How times print, by Hubble's names for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TimeFormat {
    /// `Dec  6 07:26:31.123`, local time.
    #[value(name = "StampMilli")]
    StampMilli,
    #[value(name = "RFC3339")]
    Rfc3339,
    #[value(name = "RFC3339Milli")]
    Rfc3339Milli,
    #[value(name = "RFC3339Micro")]
    Rfc3339Micro,
    #[value(name = "RFC3339Nano")]
    Rfc3339Nano,
    #[value(name = "RFC1123Z")]
    Rfc1123Z,
}

impl TimeFormat {
    /// `t` in the local time zone (the `TZ` variable, else the system's; UTC where none is set).
    pub fn format(self, t: SystemTime) -> String {
        self.format_in(t, jiff::tz::TimeZone::system())
    }

    pub(super) fn format_in(self, t: SystemTime, zone: jiff::tz::TimeZone) -> String {
        let Ok(timestamp) = jiff::Timestamp::try_from(t) else { return format!("{t:?}") };
        let local = timestamp.to_zoned(zone);
        let rfc3339 = |fraction: &str| {
            let offset = if local.offset().seconds() == 0 { "Z".into() } else { local.strftime("%:z").to_string() };
            format!("{}{offset}", local.strftime(&format!("%Y-%m-%dT%H:%M:%S{fraction}")))
        };
        match self {
            TimeFormat::StampMilli => local.strftime("%b %e %H:%M:%S%.3f").to_string(),
            TimeFormat::Rfc3339 => rfc3339(""),
            TimeFormat::Rfc3339Milli => rfc3339("%.3f"),
            TimeFormat::Rfc3339Micro => rfc3339("%.6f"),
            TimeFormat::Rfc3339Nano => rfc3339("%.9f"),
            TimeFormat::Rfc1123Z => local.strftime("%a, %d %b %Y %H:%M:%S %z").to_string(),
        }
    }
}

/// One end as a responder reads it: the pod (and the Service it was reached through), the
/// Service of an untranslated ClusterIP, else the address.
pub fn end(id: &Identity) -> String {
    end_at(id, &id.port.to_string())
}

/// Ports of a scan summary as a line shows them: the ranges, shortened past a few.
fn port_ranges(r: &FlowRecord) -> Option<String> {
    const SHOWN: usize = 40;
    let sweep = r.ports.as_ref()?;
    let shown = match sweep.ranges.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}...", &sweep.ranges[..cut]),
        None => sweep.ranges.clone(),
    };
    Some(format!("{shown} ({} ports)", sweep.count))
}

pub fn destination(r: &FlowRecord) -> String {
    match port_ranges(r) {
        Some(ports) => end_at(&r.destination, &ports),
        None => end(&r.destination),
    }
}

fn end_at(id: &Identity, port: &str) -> String {
    let at = match (&id.namespace, &id.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}:{port}"),
        _ if id.ip.is_ipv6() => format!("[{}]:{port}", id.ip),
        _ => format!("{}:{port}", id.ip),
    };
    match (&id.service, id.kind) {
        (Some(service), EndpointKind::Service) => format!("service/{service}:{port}"),
        (Some(service), _) => format!("{at} (service/{service})"),
        (None, _) => at,
    }
}

/// Who decided, in full: the sides' words, or for records written before the sides were kept,
/// the policies they name.
pub fn blame(r: &FlowRecord) -> Option<String> {
    let names: Vec<String> = r.policy.policies.iter().map(|p| p.to_string()).collect();
    r.policy.blame().or_else(|| (!names.is_empty()).then(|| format!("by {}", names.join(","))))
}

/// The kernel's reason in words, or its class where the words are not known.
fn reason_words(r: &FlowRecord) -> String {
    match (&r.reason, r.reason_class) {
        (Some(name), _) if let Some(words) = describe(name) => words.to_owned(),
        (_, Some(class)) => format!("dropped ({} class)", class.as_str()),
        _ => "dropped".to_owned(),
    }
}

/// Why the flow went as it did, in a few words: the side whose policy denied it, the kernel's
/// reason, or what allowed it.
pub fn why(r: &FlowRecord) -> String {
    match r.policy.attribution {
        Attribution::DeniedByNetworkPolicy => {
            let sides: Vec<&str> = r.policy.denying_sides().map(|(direction, _)| direction.as_str()).collect();
            if sides.is_empty() { "policy denies it".into() } else { format!("policy denies {}", sides.join(" and ")) }
        }
        Attribution::DroppedByFirewallRuleNetworkPolicyDoesNotExplain => {
            format!("{}; NetworkPolicy allows it", reason_words(r))
        }
        Attribution::DroppedByKernelForNonPolicyReason => reason_words(r),
        Attribution::AllowedByNetworkPolicy => "policy allows it".into(),
        Attribution::NotIsolated => "no policy isolates either end".into(),
        Attribution::NodeTraffic => "node traffic, always allowed".into(),
        Attribution::ForwardedDespiteNetworkPolicy => "forwarded though policy denies it".into(),
        Attribution::Reply => "reply of an allowed flow".into(),
        Attribution::ServiceWithoutEndpoints => "the Service has no endpoints".into(),
        Attribution::FirewallReply => "the firewall's answer to a blocked flow".into(),
        Attribution::NotApplicable if r.verdict == FlowVerdict::Dropped => reason_words(r),
        Attribution::NotApplicable => "not judged".into(),
    }
}

/// The kernel's reason by its name and in words: `NETFILTER_DROP (a netfilter rule dropped it)`.
pub fn kernel_reason(r: &FlowRecord) -> Option<String> {
    let name = r.reason.as_ref()?;
    let inferred = if r.reason_inferred { ", inferred" } else { "" };
    Some(match describe(name) {
        Some(words) => format!("{name} ({words}{inferred})"),
        None => format!("{name}{}", if r.reason_inferred { " (inferred)" } else { "" }),
    })
}

/// `1 pkt`, `42 pkts in 7 attempts`.
fn counts(r: &FlowRecord) -> String {
    let packets = if r.packets == 1 { "1 pkt".to_owned() } else { format!("{} pkts", r.packets) };
    if r.attempts > 1 { format!("{packets} in {} attempts", r.attempts) } else { packets }
}

/// Hubble's event type for the verdict.
fn event_type(r: &FlowRecord) -> &'static str {
    match r.verdict {
        FlowVerdict::Dropped => "drop",
        FlowVerdict::Forwarded => "trace",
    }
}

/// Why, with the kernel's name for the reason beside it: `policy denies ingress (NETFILTER_DROP)`.
fn why_and_reason(r: &FlowRecord) -> String {
    match (&r.reason, r.reason_inferred) {
        (Some(name), false) => format!("{} ({name})", why(r)),
        (Some(name), true) => format!("{} ({name}, inferred)", why(r)),
        (None, _) => why(r),
    }
}

/// One line of about 120 columns: time, node on request, the ends with ports, protocol, verdict,
/// why in words with the kernel's reason, and the counts.
pub fn compact(r: &FlowRecord, time: TimeFormat, node: bool) -> String {
    let node = if node { format!(" [{}]", r.node) } else { String::new() };
    format!(
        "{}{node} {} -> {} {} {} {} {}",
        time.format(r.time),
        end(&r.source),
        destination(r),
        r.protocol,
        r.verdict.as_str().to_uppercase(),
        why_and_reason(r),
        counts(r)
    )
}

/// Every field a responder needs, one per line, as `hubble observe -o dict` prints.
pub fn dict(r: &FlowRecord, time: TimeFormat) -> String {
    [
        ("TIMESTAMP", time.format(r.time)),
        ("LAST SEEN", time.format(r.last_seen)),
        ("SOURCE", end(&r.source)),
        ("DESTINATION", destination(r)),
        ("TYPE", event_type(r).to_owned()),
        ("VERDICT", r.verdict.as_str().to_uppercase()),
        ("SUMMARY", format!("{} {}, {}", r.protocol, why(r), counts(r))),
        ("REASON", kernel_reason(r).unwrap_or_else(|| "-".into())),
        ("POLICY", blame(r).unwrap_or_else(|| "-".into())),
        ("NODE", r.node.clone()),
        ("ID", r.id.to_string()),
    ]
    .iter()
    .map(|(key, value)| format!("{key:>11}: {value}"))
    .collect::<Vec<_>>()
    .join("\n")
}

pub const TABLE_HEADER: [&str; 9] =
    ["TIME", "NODE", "SOURCE", "DESTINATION", "PROTO", "VERDICT", "REASON", "ID", "POLICY"];

/// A table row's cells; the ID leads to `netiso evidence ID`.
pub fn table_cells(r: &FlowRecord, time: TimeFormat) -> [String; 9] {
    [
        time.format(r.time),
        r.node.clone(),
        end(&r.source),
        destination(r),
        r.protocol.to_string(),
        r.verdict.as_str().to_uppercase(),
        why_and_reason(r),
        r.id.to_string(),
        blame(r).unwrap_or_else(|| "-".into()),
    ]
}

/// Rows aligned in columns as wide as their widest cell (at least `widths`); the last column
/// is not padded.
pub fn table<const N: usize>(rows: &[[String; N]], widths: [usize; N]) -> String {
    let mut widths = widths;
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn labels(labels: &Option<Labels>) -> String {
    match labels {
        Some(l) if !l.is_empty() => l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
        _ => "-".into(),
    }
}

/// An evidence bundle as a responder reads it: the flow, the kernel's reason and where, who
/// decided, the labels judged, the policies in force, and the evaluation as `explain` prints it.
pub fn evidence_text(bundle: &EvidenceBundle, time: TimeFormat) -> String {
    let r = &bundle.record;
    let mut out = String::new();
    let _ = writeln!(out, "{}", compact(r, time, true));
    let _ = writeln!(out, "record {} on node {}, last seen {}", r.id, r.node, time.format(r.last_seen));
    let kernel = &bundle.kernel;
    if let Some(reason) = kernel_reason(r) {
        let class = kernel.reason_class.map(|c| format!(", class {}", c.as_str())).unwrap_or_default();
        let _ = writeln!(out, "\nkernel: {reason}{class}");
        if let Some(location) = &kernel.location {
            let _ = writeln!(out, "  freed at {location}");
        }
        if let Some(interface) = &kernel.interface {
            let _ = writeln!(out, "  on interface {interface}");
        }
    }
    let _ = writeln!(out, "\nverdict: {} ({})", why(r), r.policy.attribution.as_str());
    if let Some(blame) = blame(r) {
        let _ = writeln!(out, "  {blame}");
    }
    let _ = writeln!(out, "\nlabels as judged:");
    let ends = [
        ("source", end(&r.source), &bundle.labels.source),
        ("destination", end(&r.destination), &bundle.labels.destination),
    ];
    for (which, name, l) in ends {
        let _ = writeln!(out, "  {which} {name}: {}", labels(l));
    }
    let namespaces = [
        ("source", &r.source.namespace, &bundle.labels.source_namespace),
        ("destination", &r.destination.namespace, &bundle.labels.destination_namespace),
    ];
    for (which, ns, l) in namespaces {
        if let Some(ns) = ns {
            let _ = writeln!(out, "  {which} namespace {ns}: {}", labels(l));
        }
    }
    let _ = writeln!(out, "\npolicies in force:");
    if bundle.policies_in_force.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for policy in &bundle.policies_in_force {
        let meta = &policy.metadata;
        let _ = writeln!(
            out,
            "  {}/{} (resourceVersion {})",
            meta.namespace.as_deref().unwrap_or("-"),
            meta.name.as_deref().unwrap_or("-"),
            meta.resource_version.as_deref().unwrap_or("unknown")
        );
    }
    if let Some(evaluation) = &bundle.evaluation {
        let _ = write!(out, "\nevaluation:\n{}", crate::policy::render::text(evaluation));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;
    use crate::evidence::record::PortSweep;

    const UTC: TimeFormat = TimeFormat::Rfc3339;

    pub(crate) fn record() -> FlowRecord {
        serde_json::from_value(json!({
            "id": "1",
            "time": "2026-12-05T04:17:21Z",
            "last_seen": "2026-12-05T04:17:29Z",
            "node": "n1",
            "verdict": "dropped",
            "protocol": "TCP",
            "source": {"kind": "pod", "namespace": "develop", "pod": "debug", "workload": null, "ip": "10.244.0.10", "port": 40009},
            "destination": {"kind": "pod", "namespace": "production", "pod": "api", "workload": null, "ip": "10.244.0.30", "port": 8080},
            "reason": "NETFILTER_DROP",
            "packets": 1,
            "bytes": 60,
            "policy": {"verdict": "denied", "direction": "both", "attribution": "denied_by_network_policy", "policies": [], "summary": ""},
        }))
        .unwrap()
    }

    fn denied_on_ingress(mut r: FlowRecord) -> FlowRecord {
        r.policy.ingress = Some(
            serde_json::from_value(json!({"pod": "production/api", "verdict": "denied",
                "isolated_by": [{"namespace": "production", "name": "deny"}, {"namespace": "production", "name": "allow-web"}],
                "nearest": {"policy": {"namespace": "production", "name": "allow-web"}, "rule": 0, "summary": ""}}))
            .unwrap(),
        );
        r.policy.egress = Some(
            serde_json::from_value(json!({"pod": "develop/debug", "verdict": "allowed", "isolated_by": []})).unwrap(),
        );
        r
    }

    #[test]
    fn a_compact_line_says_who_denied_and_why_in_words_within_about_120_columns() {
        let r = denied_on_ingress(record());
        let line = compact(&r, TimeFormat::StampMilli, false);
        assert!(
            line.ends_with(
                " develop/debug:40009 -> production/api:8080 TCP DROPPED policy denies ingress (NETFILTER_DROP) 1 pkt"
            ),
            "{line}"
        );
        assert!(line.len() <= 120, "{} columns: {line}", line.len());
        assert!(compact(&r, UTC, true).starts_with("2026-12-05T04:17:21Z [n1] develop/debug:40009 -> "));

        let mut r = record();
        r.policy.attribution = Attribution::DroppedByKernelForNonPolicyReason;
        r.reason = Some("NO_SOCKET".into());
        r.protocol = crate::datapath::record::IpProtocol::Udp;
        assert!(compact(&r, UTC, false).ends_with(" UDP DROPPED nothing listens on the port (NO_SOCKET) 1 pkt"));
        r.policy.attribution = Attribution::DroppedByFirewallRuleNetworkPolicyDoesNotExplain;
        r.reason = Some("NETFILTER_DROP".into());
        r.reason_inferred = true;
        assert!(
            compact(&r, UTC, false).ends_with(
                " DROPPED a netfilter rule dropped it; NetworkPolicy allows it (NETFILTER_DROP, inferred) 1 pkt"
            ),
            "{}",
            compact(&r, UTC, false)
        );
        r.reason = Some("REASON_999".into());
        r.reason_class = Some(crate::datapath::reasons::ReasonClass::Other);
        assert!(
            compact(&r, UTC, false).contains(" DROPPED dropped (other class); NetworkPolicy allows it (REASON_999")
        );

        // Reached through a Service: both the backend and the Service; an untranslated ClusterIP
        // by its Service's name; a flood's attempts and a scan's ports.
        let mut r = denied_on_ingress(record());
        r.destination.service = Some("production/api".into());
        assert!(compact(&r, UTC, false).contains(" -> production/api:8080 (service/production/api) "));
        r.destination = serde_json::from_value(json!({"kind": "service", "namespace": "production", "pod": null,
            "workload": null, "service": "production/payments", "ip": "10.96.0.40", "port": 80}))
        .unwrap();
        assert!(compact(&r, UTC, false).contains(" -> service/production/payments:80 "));
        (r.attempts, r.packets) = (20_000, 20_003);
        assert!(compact(&r, UTC, false).ends_with(" 20003 pkts in 20000 attempts"), "{}", compact(&r, UTC, false));
        r.destination.port = 0;
        r.ports = Some(PortSweep { count: 19_983, ranges: "18-20000".into() });
        assert!(compact(&r, UTC, false).contains(" -> service/production/payments:18-20000 (19983 ports) "));
    }

    #[test]
    fn the_full_blame_names_the_sides_or_for_old_records_the_policies_and_no_other_drop_names_one() {
        let r = denied_on_ingress(record());
        assert_eq!(
            blame(&r).unwrap(),
            "denied by ingress of production/api (isolated by production/allow-web,production/deny; nearest production/allow-web rule 0)"
        );
        let mut old = record();
        old.policy.policies = serde_json::from_value(json!([{"namespace": "production", "name": "deny"}])).unwrap();
        assert_eq!(blame(&old).unwrap(), "by production/deny");
        assert_eq!(why(&old), "policy denies it");
        let mut other = record();
        other.policy.attribution = Attribution::DroppedByKernelForNonPolicyReason;
        assert_eq!(blame(&other), None);
    }

    #[test]
    fn a_dict_has_one_key_per_line_and_a_table_has_the_node_and_the_id() {
        let r = denied_on_ingress(record());
        let text = dict(&r, UTC);
        for line in [
            "  TIMESTAMP: 2026-12-05T04:17:21Z",
            "  LAST SEEN: 2026-12-05T04:17:29Z",
            "     SOURCE: develop/debug:40009",
            "DESTINATION: production/api:8080",
            "       TYPE: drop",
            "    VERDICT: DROPPED",
            "    SUMMARY: TCP policy denies ingress, 1 pkt",
            "     REASON: NETFILTER_DROP (a netfilter rule dropped it)",
            "     POLICY: denied by ingress of production/api (isolated by ",
            "       NODE: n1",
            "         ID: 1",
        ] {
            assert!(text.lines().any(|l| l.starts_with(line)), "{line} missing from\n{text}");
        }
        let mut other = record();
        other.id = 22;
        other.node = "worker-long-name".into();
        let rows = [TABLE_HEADER.map(str::to_owned), table_cells(&r, UTC), table_cells(&other, UTC)];
        let text = table(&rows, [0; 9]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("TIME                  NODE              SOURCE"), "{text}");
        let column = |line: &str, cell: &str| line.find(cell).unwrap();
        assert_eq!(column(lines[0], "ID"), column(lines[2], "22"), "aligned:\n{text}");
        assert_eq!(column(lines[0], "POLICY"), column(lines[1], "denied by ingress"), "aligned:\n{text}");
        assert!(lines[1].contains("  n1  ") && lines[1].contains("  1  "), "{text}");
    }

    #[test]
    fn times_print_in_hubbles_formats() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(1_796_540_018_123_456_789);
        let utc = jiff::tz::TimeZone::UTC;
        let tokyo = jiff::tz::TimeZone::fixed(jiff::tz::offset(9));
        for (format, zone, expected) in [
            (TimeFormat::StampMilli, utc.clone(), "Dec  6 06:53:38.123"),
            (TimeFormat::Rfc3339, utc.clone(), "2026-12-06T06:53:38Z"),
            (TimeFormat::Rfc3339Milli, tokyo.clone(), "2026-12-06T15:53:38.123+09:00"),
            (TimeFormat::Rfc3339Micro, utc.clone(), "2026-12-06T06:53:38.123456Z"),
            (TimeFormat::Rfc3339Nano, utc.clone(), "2026-12-06T06:53:38.123456789Z"),
            (TimeFormat::Rfc1123Z, tokyo, "Sun, 06 Dec 2026 15:53:38 +0900"),
        ] {
            assert_eq!(format.format_in(t, zone), expected, "{format:?}");
        }
    }

    #[test]
    fn evidence_reads_as_text() {
        let mut r = denied_on_ingress(record());
        r.location = Some("nft_do_chain+0x4e3".into());
        r.source.labels = Some([("app".to_owned(), "debug".to_owned())].into_iter().collect());
        let bundle = EvidenceBundle::of(r);
        let text = evidence_text(&bundle, UTC);
        for expected in [
            "2026-12-05T04:17:21Z [n1] develop/debug:40009 -> production/api:8080 TCP DROPPED policy denies ingress",
            "record 1 on node n1, last seen 2026-12-05T04:17:29Z",
            "kernel: NETFILTER_DROP (a netfilter rule dropped it)",
            "  freed at nft_do_chain+0x4e3",
            "verdict: policy denies ingress (denied_by_network_policy)",
            "  denied by ingress of production/api (isolated by production/allow-web,production/deny; nearest production/allow-web rule 0)",
            "  source develop/debug:40009: app=debug",
            "  destination production/api:8080: -",
            "policies in force:\n  none",
        ] {
            assert!(text.contains(expected), "{expected} missing from\n{text}");
        }
    }
}
