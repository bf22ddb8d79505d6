//! The shipped alerts fire on what is new or surging, not on drops a default deny causes every
//! day: `promtool test rules` over series with known histories.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

fn rules() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/netiso/monitoring/prometheusrule.yaml");
    let rule: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    rule["spec"].clone()
}

/// An alert as promtool expects it: its labels and its annotations rendered for them (the
/// annotations use `$labels` only).
fn expected(rules: &Value, alert: &str, labels: &[(&str, &str)]) -> Value {
    let rule = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .find(|r| r["alert"] == alert)
        .unwrap_or_else(|| panic!("no alert {alert}"));
    let mut all: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    for (k, v) in rule["labels"].as_object().unwrap() {
        all.insert(k.clone(), v.as_str().unwrap().to_owned());
    }
    let annotations: BTreeMap<String, String> = rule["annotations"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, template)| {
            let mut text = template.as_str().unwrap().to_owned();
            for (label, value) in labels {
                text = text.replace(&format!("{{{{ $labels.{label} }}}}"), value);
            }
            assert!(!text.contains("{{"), "{alert} {k}: a template the test does not render: {text}");
            (k.clone(), text)
        })
        .collect();
    json!({"exp_labels": all, "exp_annotations": annotations})
}

#[test]
fn alerts_fire_on_new_and_surging_drops_not_on_a_default_deny_doing_its_job() {
    let rules = rules();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yml"), serde_saphyr::to_string(&rules).unwrap()).unwrap();
    let drops = |to: &str, values: &str| json!({"series": format!("netiso_namespace_drops_total{{source_namespace=\"develop\",destination_namespace=\"{to}\",direction=\"ingress\",instance=\"n1\"}}"), "values": values});
    let policy_drops = |namespace: &str, direction: &str, nearest: &str, values: &str| json!({"series": format!("netiso_policy_drops_total{{namespace=\"{namespace}\",direction=\"{direction}\",isolated_by=\"{nearest},default-deny-all\",nearest_policy=\"{nearest}\",nearest_rule=\"0\",instance=\"n1\"}}"), "values": values});
    let surge = |ns: &str| expected(&rules, "NetisoDropSurge", &[("destination_namespace", ns)]);
    let new_drops = |alert: &str, namespace: &str| {
        expected(
            &rules,
            alert,
            &[
                ("namespace", namespace),
                ("direction", "egress"),
                ("isolated_by", "allow-dns-egress,default-deny-all"),
                ("nearest_policy", "allow-dns-egress"),
                ("nearest_rule", "0"),
            ],
        )
    };
    let tests = json!({
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    // production starts dropping at 90m (0.5/s), from nothing: a broken policy.
                    drops("production", "_x90 0+30x60"),
                    // staging drops 0.5/s all along: a default deny doing its job.
                    drops("staging", "0+30x200"),
                    // develop drops 0.2/s, then from 120m 1/s: five times the hour before.
                    drops("develop", "0+12x120 1500+60x60"),
                ],
                "alert_rule_test": [
                    {"eval_time": "85m", "alertname": "NetisoDropSurge", "exp_alerts": []},
                    {"eval_time": "110m", "alertname": "NetisoDropSurge", "exp_alerts": [surge("production")]},
                    {"eval_time": "140m", "alertname": "NetisoDropSurge", "exp_alerts": [surge("develop"), surge("production")]},
                ],
            },
            {
                "interval": "1m",
                "input_series": [
                    // production's default deny drops ingress every minute for more than a day.
                    policy_drops("production", "ingress", "allow-from-ingress-nginx", "0+2x1600"),
                    // From 1500m, production and develop pods' egress is denied where it was not.
                    policy_drops("production", "egress", "allow-dns-egress", "_x1500 0+5x100"),
                    policy_drops("develop", "egress", "allow-dns-egress", "_x1500 0+5x100"),
                ],
                "alert_rule_test": [
                    {"eval_time": "1490m", "alertname": "NetisoNewPolicyDropsInProduction", "exp_alerts": []},
                    {"eval_time": "1506m", "alertname": "NetisoNewPolicyDropsInProduction",
                        "exp_alerts": [new_drops("NetisoNewPolicyDropsInProduction", "production")]},
                    {"eval_time": "1506m", "alertname": "NetisoNewPolicyDrops",
                        "exp_alerts": [new_drops("NetisoNewPolicyDrops", "develop")]},
                    // A day-old pattern is no longer new: it stops paging.
                    {"eval_time": "1530m", "alertname": "NetisoNewPolicyDropsInProduction", "exp_alerts": []},
                ],
            },
        ],
    });
    let test_file = dir.path().join("alerts.test.yml");
    std::fs::write(&test_file, serde_saphyr::to_string(&tests).unwrap()).unwrap();
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&test_file)
        .current_dir(dir.path())
        .output()
        .expect("promtool (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
