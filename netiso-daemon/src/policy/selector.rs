//! Kubernetes label selectors: compiled once, matched many times, and able to say which
//! requirement a label set failed.

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::{Deserialize, Serialize};

pub use crate::cluster::Labels;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: BTreeSet<String>,
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            // An absent key satisfies NotIn, as in apimachinery.
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values = || self.values.iter().cloned().collect::<Vec<_>>().join(",");
        match self.operator {
            Operator::In if self.values.len() == 1 => write!(f, "{}={}", self.key, values()),
            Operator::In => write!(f, "{} in ({})", self.key, values()),
            Operator::NotIn if self.values.len() == 1 => write!(f, "{}!={}", self.key, values()),
            Operator::NotIn => write!(f, "{} notin ({})", self.key, values()),
            Operator::Exists => write!(f, "{}", self.key),
            Operator::DoesNotExist => write!(f, "!{}", self.key),
        }
    }
}

/// A compiled selector: the AND of its requirements (matchLabels become `In` with one value).
/// No requirements selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

/// One requirement a label set failed, with the value it had.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelMiss {
    pub requirement: String,
    pub key: String,
    /// The label's value on the object, or none when the key is absent.
    pub actual: Option<String>,
}

impl fmt::Display for LabelMiss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.actual {
            Some(v) => write!(f, "needs {} but has {}={}", self.requirement, self.key, v),
            None => write!(f, "needs {} but has no {} label", self.requirement, self.key),
        }
    }
}

impl Selector {
    pub fn everything() -> Self {
        Selector::default()
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    pub fn misses(&self, labels: &Labels) -> Vec<LabelMiss> {
        self.requirements
            .iter()
            .filter(|r| !r.matches(labels))
            .map(|r| LabelMiss { requirement: r.to_string(), key: r.key.clone(), actual: labels.get(&r.key).cloned() })
            .collect()
    }

    /// Compiles a Kubernetes LabelSelector. Errors are `(field suffix, message)` pairs relative
    /// to the selector, for the caller to prefix with the selector's own path.
    pub fn compile(selector: &LabelSelector) -> Result<Self, Vec<(String, String)>> {
        let mut requirements = Vec::new();
        let mut errors = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            if let Err(e) = validate_key(key) {
                errors.push((format!(".matchLabels[{key}]"), e));
            }
            if let Err(e) = validate_value(value) {
                errors.push((format!(".matchLabels[{key}]"), e));
            }
            requirements.push(Requirement {
                key: key.clone(),
                operator: Operator::In,
                values: BTreeSet::from([value.clone()]),
            });
        }
        for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let field = format!(".matchExpressions[{i}]");
            let values: BTreeSet<String> = expr.values.iter().flatten().cloned().collect();
            if let Err(e) = validate_key(&expr.key) {
                errors.push((format!("{field}.key"), e));
            }
            let operator = match expr.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    errors.push((
                        format!("{field}.operator"),
                        format!("unknown operator `{other}`; use In, NotIn, Exists or DoesNotExist"),
                    ));
                    continue;
                }
            };
            match operator {
                Operator::In | Operator::NotIn if values.is_empty() => errors
                    .push((format!("{field}.values"), format!("operator {} needs at least one value", expr.operator))),
                Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                    errors.push((format!("{field}.values"), format!("operator {} takes no values", expr.operator)))
                }
                _ => {}
            }
            for v in &values {
                if let Err(e) = validate_value(v) {
                    errors.push((format!("{field}.values"), e));
                }
            }
            requirements.push(Requirement { key: expr.key.clone(), operator, values });
        }
        if errors.is_empty() { Ok(Selector { requirements }) } else { Err(errors) }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return write!(f, "<all>");
        }
        let parts: Vec<String> = self.requirements.iter().map(ToString::to_string).collect();
        write!(f, "{}", parts.join(","))
    }
}

fn is_name_part(s: &str) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && s.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !part.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// Label keys: an optional DNS-subdomain prefix and a name of at most 63 characters.
pub fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if prefix.is_some_and(|p| !is_dns_subdomain(p)) || !is_name_part(name) {
        return Err(format!("`{key}` is not a valid label key"));
    }
    Ok(())
}

pub fn validate_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_name_part(value) { Ok(()) } else { Err(format!("`{value}` is not a valid label value")) }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    fn selector(exprs: Vec<LabelSelectorRequirement>) -> Selector {
        Selector::compile(&LabelSelector { match_expressions: Some(exprs), match_labels: None }).unwrap()
    }

    #[test]
    fn operators_follow_apimachinery() {
        let l = labels(&[("x", "foo"), ("y", "")]);
        assert!(selector(vec![expr("x", "In", &["foo", "bar"])]).matches(&l));
        assert!(!selector(vec![expr("z", "In", &["foo"])]).matches(&l));
        assert!(selector(vec![expr("z", "NotIn", &["foo"])]).matches(&l), "absent key satisfies NotIn");
        assert!(!selector(vec![expr("x", "NotIn", &["foo"])]).matches(&l));
        assert!(selector(vec![expr("y", "Exists", &[])]).matches(&l), "an empty value still exists");
        assert!(selector(vec![expr("z", "DoesNotExist", &[])]).matches(&l));
        assert!(!selector(vec![expr("x", "DoesNotExist", &[])]).matches(&l));
        assert!(Selector::everything().matches(&l));
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let s = Selector::compile(&LabelSelector {
            match_labels: Some(BTreeMap::from([("app".into(), "web".into())])),
            match_expressions: Some(vec![expr("tier", "In", &["front"])]),
        })
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front")])));
        let misses = s.misses(&labels(&[("app", "db")]));
        assert_eq!(misses.len(), 2);
        assert_eq!(misses[0].to_string(), "needs app=web but has app=db");
        assert_eq!(misses[1].to_string(), "needs tier=front but has no tier label");
    }

    #[test]
    fn invalid_selectors_name_the_field() {
        let errors = Selector::compile(&LabelSelector {
            match_expressions: Some(vec![
                expr("a", "Contains", &["x"]),
                expr("b", "In", &[]),
                expr("c", "Exists", &["x"]),
                expr("bad key!", "Exists", &[]),
            ]),
            match_labels: None,
        })
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                ".matchExpressions[0].operator",
                ".matchExpressions[1].values",
                ".matchExpressions[2].values",
                ".matchExpressions[3].key"
            ]
        );
    }

    #[test]
    fn key_and_value_syntax() {
        assert!(validate_key("kubernetes.io/metadata.name").is_ok());
        assert!(validate_key("app").is_ok());
        assert!(validate_key("Bad.Prefix/app").is_err());
        assert!(validate_key("-app").is_err());
        assert!(validate_value("").is_ok());
        assert!(validate_value("v1.2_3-x").is_ok());
        assert!(validate_value("has space").is_err());
    }
}
