//! The filters of `observe`, `top` and `graph`: `hubble observe`'s, sent to the daemons as the
//! parameters of `GET /v1/flows`.

use std::collections::BTreeSet;

use anyhow::bail;
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Args};

/// The filters of `observe`, `top` and `graph`: `hubble observe`'s.
#[derive(Debug, Args)]
pub struct Filters {
    /// DROPPED or FORWARDED (any case; drop and forward too).
    #[arg(long, help_heading = "Filters")]
    pub verdict: Option<String>,
    /// Hubble's event type: drop (dropped flows) or trace (forwarded flows).
    #[arg(long = "type", short = 't', value_name = "TYPE", help_heading = "Filters")]
    pub event_type: Option<String>,
    /// Either end in this namespace.
    #[arg(long, short = 'n', help_heading = "Filters")]
    pub namespace: Option<String>,
    #[arg(long, help_heading = "Filters")]
    pub from_namespace: Option<String>,
    #[arg(long, help_heading = "Filters")]
    pub to_namespace: Option<String>,
    /// Either end: namespace/pod (a name prefix: production/api finds production/api-7d9f8-x2x4k),
    /// namespace/ (every pod of it), or a pod name prefix in any namespace.
    #[arg(long, help_heading = "Filters")]
    pub pod: Option<String>,
    #[arg(long, help_heading = "Filters")]
    pub from_pod: Option<String>,
    #[arg(long, help_heading = "Filters")]
    pub to_pod: Option<String>,
    /// Either end's labels match this selector: app=api,tier!=db,!canary.
    #[arg(long, short = 'l', help_heading = "Filters")]
    pub label: Option<String>,
    #[arg(long, help_heading = "Filters")]
    pub from_label: Option<String>,
    #[arg(long, help_heading = "Filters")]
    pub to_label: Option<String>,
    /// Either end's address: an address or a CIDR (10.244.0.0/16).
    #[arg(long, help_heading = "Filters")]
    pub ip: Option<String>,
    #[arg(long, help_heading = "Filters")]
    pub from_ip: Option<String>,
    #[arg(long, help_heading = "Filters")]
    pub to_ip: Option<String>,
    /// Either end's port (a port scan's destination ports included).
    #[arg(long, help_heading = "Filters")]
    pub port: Option<u16>,
    #[arg(long, help_heading = "Filters")]
    pub from_port: Option<u16>,
    #[arg(long, help_heading = "Filters")]
    pub to_port: Option<u16>,
    #[arg(long, help_heading = "Filters")]
    pub protocol: Option<String>,
    /// The kernel's drop reason, e.g. NETFILTER_DROP.
    #[arg(long, help_heading = "Filters")]
    pub reason: Option<String>,
    /// namespace/name of a NetworkPolicy.
    #[arg(long, help_heading = "Filters")]
    pub policy: Option<String>,
    /// Recorded on this node: a name, or a pattern like worker-*.
    #[arg(long, help_heading = "Filters")]
    pub node_name: Option<String>,
    /// Leave out the flows the next filter matches (--not --namespace kube-system); several
    /// negated filters leave out the flows matching all of them.
    #[arg(long, num_args = 0, default_missing_value = "true", action = ArgAction::Append, help_heading = "Filters")]
    pub not: Vec<bool>,
    /// The filters a preceding --not negates, by argument id (from the command line's order).
    #[arg(skip)]
    pub negated: BTreeSet<String>,
}

/// The filter arguments, by id, and the API parameter each becomes.
const FILTERS: [(&str, &str); 21] = [
    ("verdict", "verdict"),
    ("event_type", "verdict"),
    ("namespace", "namespace"),
    ("from_namespace", "from-namespace"),
    ("to_namespace", "to-namespace"),
    ("pod", "pod"),
    ("from_pod", "from-pod"),
    ("to_pod", "to-pod"),
    ("label", "label"),
    ("from_label", "from-label"),
    ("to_label", "to-label"),
    ("ip", "ip"),
    ("from_ip", "from-ip"),
    ("to_ip", "to-ip"),
    ("port", "port"),
    ("from_port", "from-port"),
    ("to_port", "to-port"),
    ("protocol", "protocol"),
    ("reason", "reason"),
    ("policy", "policy"),
    ("node_name", "node"),
];

/// Which filters the command line's `--not`s negate: each the argument right after it, which
/// must be a filter.
pub fn negated(matches: &ArgMatches) -> Result<BTreeSet<String>, String> {
    let given: Vec<(usize, &str)> = matches
        .ids()
        .map(|id| id.as_str())
        .filter(|id| *id != "not" && matches.value_source(id) == Some(ValueSource::CommandLine))
        .filter_map(|id| Some((matches.indices_of(id)?.next()?, id)))
        .collect();
    let mut negated = BTreeSet::new();
    let nots = matches.indices_of("not").filter(|_| matches.value_source("not") == Some(ValueSource::CommandLine));
    for not in nots.into_iter().flatten() {
        let next = given.iter().filter(|(at, _)| *at > not).min_by_key(|(at, _)| *at);
        match next {
            Some((_, id)) if FILTERS.iter().any(|(filter, _)| filter == id) => negated.insert(id.to_string()),
            _ => return Err("--not goes right before the filter it negates: --not --namespace kube-system".into()),
        };
    }
    Ok(negated)
}

impl Filters {
    /// The API parameters of the filters (`not.` before a negated one's).
    pub fn params(&self) -> anyhow::Result<Vec<(String, String)>> {
        let event_type = match self.event_type.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None => None,
            Some("drop") => Some("dropped".to_owned()),
            Some("trace") => Some("forwarded".to_owned()),
            Some(other) => bail!("--type {other}: use drop (dropped flows) or trace (forwarded flows)"),
        };
        if let (Some(verdict), Some(_)) = (&self.verdict, &event_type) {
            bail!("--verdict {verdict} and --type both choose the verdict: give one");
        }
        let port = |p: Option<u16>| p.map(|p| p.to_string());
        let values = [
            self.verdict.clone(),
            event_type,
            self.namespace.clone(),
            self.from_namespace.clone(),
            self.to_namespace.clone(),
            self.pod.clone(),
            self.from_pod.clone(),
            self.to_pod.clone(),
            self.label.clone(),
            self.from_label.clone(),
            self.to_label.clone(),
            self.ip.clone(),
            self.from_ip.clone(),
            self.to_ip.clone(),
            port(self.port),
            port(self.from_port),
            port(self.to_port),
            self.protocol.clone(),
            self.reason.clone(),
            self.policy.clone(),
            self.node_name.clone(),
        ];
        Ok(FILTERS
            .iter()
            .zip(values)
            .filter_map(|((id, param), value)| {
                let name = if self.negated.contains(*id) { format!("not.{param}") } else { param.to_string() };
                Some((name, value?))
            })
            .collect())
    }

    /// Whether a verdict is chosen (by --verdict or --type).
    pub fn choose_verdict(&self) -> bool {
        self.verdict.is_some() || self.event_type.is_some()
    }
}
