//! What users touch, in the lab: a real Prometheus scraping `netiso run`, every PromQL
//! expression of the dashboard and the alerts, promtool, and the CLI against two daemons.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use xtask::lab::{self, Lab, ProbeKind};
use xtask::netns;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo() -> PathBuf {
    lab::repo_root()
}

/// Every PromQL expression of the dashboard (with Grafana's interval filled in) and the alerts.
fn expressions() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/netiso/monitoring/dashboards/netiso.json")).unwrap(),
    )
    .unwrap();
    // Namespace and node variables, runbook links, and every series named by its labels.
    let variables: Vec<&str> =
        dashboard["templating"]["list"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
    assert!(variables.contains(&"namespace") && variables.contains(&"node"), "{variables:?}");
    assert!(
        dashboard["links"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["url"].as_str().unwrap().ends_with("operations.md#alerts")),
        "a runbook link"
    );
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap();
            assert!(!target["legendFormat"].as_str().unwrap_or_default().is_empty(), "{title}: unlabelled series");
            let expr = target["expr"].as_str().unwrap();
            assert!(expr.contains("$node"), "{title}: follows the node variable");
            assert!(!expr.contains("[1h]") && !expr.contains("[24h]"), "{title}: follows the time picker");
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$__range", "1h")
                .replace("$namespace", ".*")
                .replace("$node", ".*");
            out.push((format!("panel {title}"), expr));
        }
    }
    let rules: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join("deploy/netiso/monitoring/prometheusrule.yaml")).unwrap(),
    )
    .unwrap();
    for group in rules["spec"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            out.push((format!("alert {}", rule["alert"].as_str().unwrap()), rule["expr"].as_str().unwrap().to_owned()));
        }
    }
    out
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn prom_query(node: &str, expr: &str) -> Value {
    let (status, body) =
        netns::get(node, "127.0.0.1:9090".parse().unwrap(), &format!("/api/v1/query?query={}", encode(expr))).unwrap();
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{status}: {body}"));
    assert_eq!(v["status"], "success", "{expr}: {body}");
    v
}

fn promtool(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/setup installs prometheus)");
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().unwrap()
}

fn cli(lab: &Lab, netiso: &Path, args: &[&str]) -> (bool, String, String) {
    let out = lab.in_node_output(netiso, args).unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn prometheus_dashboards_alerts_and_the_cli_over_the_lab() {
    let (lab, scratch) = lab::for_test("e", Path::new(env!("CARGO_BIN_EXE_xtask")));
    let out = scratch.0.clone();
    let netiso = xtask::build::netiso(false).expect("netiso builds");
    let guard = lab.up_guarded(&lab::baseline_policies().unwrap()).expect("lab comes up");
    let node = lab.node_ns();
    let mut a = lab.observe_as(&netiso, "lab-a", "127.0.0.1:9963", "127.0.0.1:9962", &[]).expect("first netiso");
    let mut b = lab.observe_as(&netiso, "lab-b", "127.0.0.1:9964", "127.0.0.1:9965", &[]).expect("second netiso");

    let config = out.join("prometheus.yml");
    std::fs::write(&config, "global: {scrape_interval: 1s, evaluation_interval: 1s}\nscrape_configs:\n- job_name: netiso\n  static_configs:\n  - targets: ['127.0.0.1:9962', '127.0.0.1:9965']\n").unwrap();
    let mut prometheus = Killed(
        Command::new("ip")
            .args(["netns", "exec", &node, "prometheus", "--web.listen-address=127.0.0.1:9090"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", out.join("tsdb").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (scripts/setup installs it)"),
    );

    for r in lab.traffic().unwrap() {
        assert_eq!(r.observed, r.expected, "{}", r.probe);
    }

    // Prometheus opens its port some time after it starts, later still on a loaded machine.
    let prometheus_ready = Instant::now() + Duration::from_secs(120);
    loop {
        match netns::get(&node, "127.0.0.1:9090".parse().unwrap(), "/-/ready") {
            Ok((200, _)) => break,
            _ if let Ok(Some(status)) = prometheus.0.try_wait() => panic!("Prometheus exited: {status}"),
            other => assert!(Instant::now() < prometheus_ready, "Prometheus never became ready: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    // The blocked flow shows in the policy-drop metric: production's ingress, the policies
    // isolating its pods, and the rule that came nearest.
    let deadline = Instant::now() + Duration::from_secs(60);
    let metric = r#"netiso_policy_drops_total{namespace="production",direction="ingress",nearest_policy="allow-from-ingress-nginx"}"#;
    loop {
        let v = prom_query(&node, metric);
        let value = v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
        if value > 0.0 {
            assert_eq!(
                v["data"]["result"][0]["metric"]["isolated_by"], "allow-from-ingress-nginx,default-deny-all",
                "{v}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the policy drop never reached Prometheus: {v}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // The blocked conversation, by workload and port, for the dashboard's top table.
    let blocked = prom_query(
        &node,
        r#"netiso_blocked_packets_total{source_namespace="develop",destination_namespace="production",destination_port="8080",protocol="TCP"}"#,
    );
    let series = &blocked["data"]["result"][0]["metric"];
    assert_eq!(series["source_workload"], "debug", "{blocked}");
    assert!(series["destination_workload"].as_str().unwrap().starts_with("api"), "{blocked}");
    for (what, expr) in expressions() {
        prom_query(&node, &expr);
        eprintln!("ok: {what}");
    }
    let _ = &prometheus;

    // promtool: the rules and the exposition are clean.
    let rules: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join("deploy/netiso/monitoring/prometheusrule.yaml")).unwrap(),
    )
    .unwrap();
    let rules_file = out.join("rules.yml");
    std::fs::write(&rules_file, serde_saphyr::to_string(&rules["spec"]).unwrap()).unwrap();
    let check = promtool(&["check", "rules", rules_file.to_str().unwrap()], None);
    assert!(
        check.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let (status, exposition) = netns::get(&node, "127.0.0.1:9962".parse().unwrap(), "/metrics").unwrap();
    assert_eq!(status, 200);
    let check = promtool(&["check", "metrics"], Some(&exposition));
    let complaints = format!("{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    assert!(check.status.success() && complaints.trim().is_empty(), "promtool check metrics: {complaints}");
    for family in [
        "netiso_drops_total",
        "netiso_forwarded_packets_total",
        "netiso_datapath_lost_events_total",
        "netiso_inventory_objects",
        "netiso_store_records",
        "netiso_build_info",
    ] {
        assert!(exposition.contains(family), "{family} missing from /metrics");
    }

    // Health and readiness on the metrics listener, and a bad parameter named in a 400.
    let metrics: SocketAddr = "127.0.0.1:9962".parse().unwrap();
    assert_eq!(netns::get(&node, metrics, "/healthz").unwrap().0, 200);
    assert_eq!(netns::get(&node, metrics, "/readyz").unwrap().0, 200);
    let api: SocketAddr = "127.0.0.1:9963".parse().unwrap();
    let (status, body) = netns::get(&node, api, "/v1/flows?port=eighty").unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("parameter `port`"), "{body}");

    // observe: two servers merged and ordered by time, with filters.
    let servers = ["--server", "http://127.0.0.1:9963", "--server", "http://127.0.0.1:9964"];
    let mut args = vec!["observe"];
    args.extend(servers);
    args.extend([
        "--verdict",
        "dropped",
        "--from-namespace",
        "develop",
        "--to-pod",
        "production/api",
        "--port",
        "8080",
        "--protocol",
        "TCP",
        "--last",
        "50",
        "-o",
        "json",
    ]);
    let (ok, stdout, stderr) = cli(&lab, &netiso, &args);
    assert!(ok, "{stderr}");
    let flows = json_lines(&stdout);
    assert!(
        flows.iter().any(|f| f["node"] == "lab-a") && flows.iter().any(|f| f["node"] == "lab-b"),
        "both servers answered: {stdout}"
    );
    let ids: Vec<u64> = flows.iter().map(|f| f["id"].as_str().unwrap().parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] <= w[1]), "ordered by time");
    for f in &flows {
        assert_eq!(f["verdict"], "dropped");
        assert_eq!(f["source"]["namespace"], "develop");
        assert_eq!(f["destination"]["pod"], "api");
        assert_eq!(f["destination"]["port"], 8080);
        assert_eq!(f["reason"], "NETFILTER_DROP");
        assert_eq!(f["policy"]["attribution"], "denied_by_network_policy");
        let ingress = &f["policy"]["ingress"];
        assert_eq!((&ingress["pod"], &ingress["verdict"]), (&json!("production/api"), &json!("denied")), "{f}");
        let isolated_by: Vec<&str> =
            ingress["isolated_by"].as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
        assert!(isolated_by.contains(&"default-deny-all") && isolated_by.contains(&"allow-from-ingress-nginx"), "{f}");
        assert_eq!(ingress["nearest"]["policy"]["name"], "allow-from-ingress-nginx", "{f}");
        for key in ["namespace", "pod", "workload", "ip", "port"] {
            assert!(f["source"].get(key).is_some() && f["destination"].get(key).is_some(), "{key} missing");
        }
    }
    // A line says who denied it in words; the table names the denying side, the policies
    // isolating its pod and the nearest rule, beside the node and the id that leads to evidence.
    let (ok, lines, stderr) = cli(
        &lab,
        &netiso,
        &["observe", "--server", "http://127.0.0.1:9963", "--verdict", "dropped", "--to-pod", "production/api"],
    );
    assert!(ok, "{stderr}");
    assert!(
        lines
            .lines()
            .any(|l| l.contains(" -> production/api:8080 TCP DROPPED policy denies ")
                && l.contains(" (NETFILTER_DROP) ")),
        "{lines}"
    );
    let (ok, denied, stderr) = cli(
        &lab,
        &netiso,
        &[
            "observe",
            "--server",
            "http://127.0.0.1:9963",
            "--verdict",
            "dropped",
            "--to-pod",
            "production/api",
            "-o",
            "table",
        ],
    );
    assert!(ok, "{stderr}");
    let header = denied.lines().next().unwrap();
    assert!(
        header.starts_with("TIME")
            && header.contains(" NODE ")
            && header.contains(" ID ")
            && header.ends_with("POLICY"),
        "{denied}"
    );
    let blocked_row = denied
        .lines()
        .find(|l| l.contains("develop/debug:") && l.contains("production/api:8080"))
        .unwrap_or_else(|| panic!("no row for the blocked flow: {denied}"));
    assert!(
        blocked_row.contains(
            "ingress of production/api (isolated by production/allow-from-ingress-nginx,production/default-deny-all; nearest production/allow-from-ingress-nginx rule "
        ) && blocked_row.contains("  lab-a  "),
        "{denied}"
    );
    let (ok, table, _) = cli(
        &lab,
        &netiso,
        &[
            "observe",
            "--server",
            "http://127.0.0.1:9963",
            "--verdict",
            "forwarded",
            "--to-namespace",
            "kube-system",
            "-o",
            "table",
        ],
    );
    assert!(ok && table.starts_with("TIME") && table.contains("kube-system/coredns:53"), "{table}");
    assert!(table.lines().skip(1).all(|row| row.contains(" FORWARDED ")), "{table}");

    // Hubble's flags: verdict in capitals, --pod and --ip on either end, a negated filter, a node
    // pattern, and --since without --last: every flow of the window, as the API lists them.
    let mut args = vec!["observe"];
    args.extend(servers);
    args.extend([
        "--verdict",
        "DROPPED",
        "--pod",
        "production/",
        "--ip",
        "10.244.0.0/16",
        "--not",
        "--namespace",
        "kube-system",
        "--label",
        "app=api",
        "--port",
        "8080",
        "--node-name",
        "lab-*",
        "--since",
        "1h",
        "-o",
        "json",
    ]);
    let listed = |server: &str| {
        let (status, body) = netns::get(
            &node,
            server.parse().unwrap(),
            "/v1/flows?verdict=dropped&pod=production/&ip=10.244.0.0/16&not.namespace=kube-system&label=app%3Dapi&port=8080&node=lab-*&since=1h&limit=10000",
        )
        .unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()["flows"].as_array().unwrap().len()
    };
    // Records may still arrive meanwhile: the listing holds at least those before and at most
    // those after.
    let before = listed("127.0.0.1:9963") + listed("127.0.0.1:9964");
    let (ok, stdout, stderr) = cli(&lab, &netiso, &args);
    assert!(ok, "{stderr}");
    let window = json_lines(&stdout);
    let after = listed("127.0.0.1:9963") + listed("127.0.0.1:9964");
    assert!(!window.is_empty(), "the blocked flow matches");
    assert!((before..=after).contains(&window.len()), "the whole window: {before}..={after} {stdout}");
    for f in &window {
        assert_eq!(f["verdict"], "dropped", "{f}");
        assert!(f["source"]["namespace"] == "production" || f["destination"]["namespace"] == "production", "{f}");
        assert!(f["source"]["namespace"] != "kube-system" && f["destination"]["namespace"] != "kube-system", "{f}");
    }
    // --type drop, ports and labels by end, --first with a dict and the node's name.
    let (ok, dict, stderr) = cli(
        &lab,
        &netiso,
        &[
            "observe",
            "--server",
            "http://127.0.0.1:9963",
            "--type",
            "drop",
            "--from-label",
            "app=debug",
            "--to-port",
            "8080",
            "--first",
            "1",
            "--time-format",
            "RFC3339",
            "-o",
            "dict",
        ],
    );
    assert!(ok, "{stderr}");
    let first = {
        let (_, body) = netns::get(
            &node,
            api,
            "/v1/flows?verdict=dropped&from-label=app%3Ddebug&to-port=8080&order=oldest&limit=1",
        )
        .unwrap();
        serde_json::from_str::<Value>(&body).unwrap()["flows"][0]["id"].as_str().unwrap().to_owned()
    };
    assert!(dict.lines().any(|l| l == format!("         ID: {first}")), "the oldest: {first}\n{dict}");
    assert!(
        dict.lines().any(|l| l == "       NODE: lab-a") && dict.lines().any(|l| l == "       TYPE: drop"),
        "{dict}"
    );
    assert!(dict.lines().any(|l| l.starts_with("  TIMESTAMP: 20") && l.ends_with('Z')), "{dict}");
    assert!(!dict.contains("------------"), "one flow: {dict}");
    let compact = |extra: &[&str]| {
        let mut args = vec!["observe", "--server", "http://127.0.0.1:9963", "--type", "drop", "--last", "1"];
        args.extend(extra);
        let (ok, line, stderr) = cli(&lab, &netiso, &args);
        assert!(ok, "{stderr}");
        line
    };
    assert!(compact(&["--print-node-name"]).contains(" [lab-a] "), "the node on request");
    assert!(!compact(&[]).contains("[lab-a]"), "one server: no node unless asked");

    // evidence: the bundle for the blocked flow.
    let blocked = flows.iter().find(|f| f["node"] == "lab-a").unwrap();
    let id = blocked["id"].as_str().unwrap();
    let (ok, text, stderr) = cli(&lab, &netiso, &["evidence", id, "--server", "http://127.0.0.1:9963"]);
    assert!(ok, "{stderr}");
    for expected in [
        "kernel: NETFILTER_DROP (a netfilter rule dropped it), class policy",
        "  freed at nft_do_chain",
        "verdict: policy denies ",
        "  denied by ",
        "  source develop/debug:",
        "policies in force:",
        "  production/default-deny-all (resourceVersion ",
        "evaluation:",
        "suggested minimal policy",
    ] {
        assert!(text.contains(expected), "{expected} missing from the evidence:\n{text}");
    }
    let (ok, bundle, stderr) = cli(&lab, &netiso, &["evidence", id, "--server", "http://127.0.0.1:9963", "-o", "json"]);
    assert!(ok, "{stderr}");
    let bundle: Value = serde_json::from_str(&bundle).unwrap();
    assert_eq!(bundle["kernel"]["reason"], "NETFILTER_DROP");
    assert!(bundle["kernel"]["location"].as_str().unwrap().starts_with("nft_do_chain"));
    let in_force = bundle["policies_in_force"].as_array().unwrap();
    assert!(
        in_force
            .iter()
            .any(|p| p["metadata"]["name"] == "default-deny-all" && p["metadata"]["resourceVersion"].is_string()),
        "{in_force:?}"
    );
    assert_eq!(bundle["labels"]["source"]["app"], "debug");
    assert_eq!(bundle["labels"]["destination_namespace"]["kubernetes.io/metadata.name"], "production");
    assert_eq!(bundle["evaluation"]["ingress"]["nearest_misses"][0]["policy"]["name"], "allow-from-ingress-nginx");
    assert!(bundle["suggested_policy"]["yaml"].as_str().unwrap().contains("kind: NetworkPolicy"));

    // follow: a new blocked attempt arrives on the open stream, as a new record or as an update
    // of its conversation's record (the same id, counting one attempt more).
    let attempts_before: std::collections::HashMap<String, u64> = {
        let (_, body) = netns::get(&node, api, "/v1/flows?verdict=dropped&port=8080&limit=10000").unwrap();
        let list: Value = serde_json::from_str(&body).unwrap();
        list["flows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f["id"].as_str().unwrap().to_owned(), f["attempts"].as_u64().unwrap_or(1)))
            .collect()
    };
    let mut follow = Killed(
        Command::new("ip")
            .args(["netns", "exec", &node])
            .arg(&netiso)
            .args([
                "observe",
                "--server",
                "http://127.0.0.1:9963",
                "--follow",
                "--verdict",
                "dropped",
                "--last",
                "1",
                "-o",
                "json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follow.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let api_ip = lab::scenario::pod("production/api").ipv4();
    assert!(!lab.probe_from("develop/debug", ProbeKind::Tcp, SocketAddr::new(api_ip, 8080), 45555));
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = false;
    while Instant::now() < deadline && !seen {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            let v: Value = serde_json::from_str(&line).unwrap();
            let attempts = v["attempts"].as_u64().unwrap_or(1);
            let counted_again = v["source"]["ip"] == "10.244.0.10"
                && v["destination"]["port"] == 8080
                && v["protocol"] == "TCP"
                && v["id"].as_str().and_then(|id| attempts_before.get(id)).is_some_and(|before| attempts > *before);
            seen = v["source"]["port"] == 45555 || counted_again;
        }
    }
    assert!(seen, "the new drop arrived on the follow stream");
    drop(follow);

    // top: a scenario with known counts, on ports no other probe uses: five blocked attempts
    // at :8443 and two at :8444, each from its own source port.
    for (port, source_ports) in [(8443, 46201..=46205), (8444, 46211..=46212)] {
        for source_port in source_ports {
            assert!(!lab.probe_from("develop/debug", ProbeKind::Tcp, SocketAddr::new(api_ip, port), source_port));
        }
    }
    let top = |args: &[&str]| {
        let mut all = vec!["top", "--server", "http://127.0.0.1:9963", "--since", "1h"];
        all.extend(args);
        let (ok, stdout, stderr) = cli(&lab, &netiso, &all);
        assert!(ok, "{stderr}");
        stdout
    };
    let attempts = |answer: &Value, grouping: &str, key: &str| {
        answer["rankings"][grouping]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["key"] == key)
            .map(|row| row["attempts"].as_u64().unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let answer: Value = serde_json::from_str(&top(&["-o", "json", "--limit", "50"])).unwrap();
        let counted = (
            attempts(&answer, "conversation", "develop/debug -> production/api:8443 TCP"),
            attempts(&answer, "conversation", "develop/debug -> production/api:8444 TCP"),
        );
        if counted == (Some(5), Some(2)) || Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(attempts(&answer, "conversation", "develop/debug -> production/api:8443 TCP"), Some(5), "{answer:#}");
    assert_eq!(attempts(&answer, "conversation", "develop/debug -> production/api:8444 TCP"), Some(2), "{answer:#}");
    assert_eq!(attempts(&answer, "port", "TCP/8443"), Some(5), "{answer:#}");
    assert_eq!(answer["verdict"], "dropped");
    let row = answer["rankings"]["conversation"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "develop/debug -> production/api:8443 TCP")
        .unwrap();
    assert_eq!(row["nodes"], json!(["lab-a"]));
    assert!(row["first_seen"].as_str().unwrap() <= row["last_seen"].as_str().unwrap(), "{row}");
    let at_least = |grouping: &str, key: &str, n: u64| {
        let got = attempts(&answer, grouping, key).unwrap_or(0);
        assert!(got >= n, "{grouping} {key}: {got} < {n}: {answer:#}");
    };
    at_least("namespace", "develop -> production", 7);
    at_least("pods", "develop/debug -> production/api", 7);
    let policy = answer["rankings"]["policy"].as_array().unwrap();
    assert!(
        policy.iter().any(|r| r["key"]
            .as_str()
            .unwrap()
            .contains("ingress of production, nearest production/allow-from-ingress-nginx rule ")
            && r["attempts"].as_u64().unwrap() >= 7),
        "{answer:#}"
    );
    let text = top(&["--by", "conversation", "--limit", "50"]);
    assert!(text.starts_with("dropped flows since 1h: "), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("develop/debug -> production/api:8443 TCP ")
            && l.contains(" 5 ")
            && l.ends_with("lab-a")),
        "{text}"
    );

    // graph: who talks to whom around production, blocked edges marked.
    let graph = |output: &str| {
        let (ok, stdout, stderr) = cli(
            &lab,
            &netiso,
            &["graph", "--server", "http://127.0.0.1:9963", "--since", "1h", "-n", "production", "-o", output],
        );
        assert!(ok, "{stderr}");
        stdout
    };
    let table = graph("text");
    let edge = table
        .lines()
        .find(|l| l.starts_with("develop/debug ") && l.contains(" production/api "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(edge.contains("TCP/8443") && edge.contains("TCP/8444"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("ingress-nginx/controller ") && l.contains(" production/api ")),
        "{table}"
    );
    let dot = graph("dot");
    assert!(dot.contains(r#""develop/debug" -> "production/api" ["#) && dot.contains("color=red"), "{dot}");
    let mermaid = graph("mermaid");
    assert!(mermaid.starts_with("flowchart LR") && mermaid.contains(" blocked)\" .-> "), "{mermaid}");

    a.stop().unwrap();
    b.stop().unwrap();
    drop(prometheus);
    guard.down().unwrap();
}
