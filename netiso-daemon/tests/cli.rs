//! The `netiso` binary as users run it: explain against manifests, and the errors `run` gives
//! before it touches the kernel.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn netiso(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netiso")).args(args).output().expect("netiso runs")
}

fn fixture() -> String {
    format!("{}/tests/fixtures/course.yaml", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn explain_names_the_isolating_policies_and_the_failed_namespace_label() {
    let out = netiso(&[
        "explain",
        "--manifests",
        &fixture(),
        "--from",
        "develop/debug",
        "--to",
        "production/api",
        "--port",
        "8080",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("DENIED  develop/debug (10.244.0.10) -> production/api (10.244.0.30) TCP/8080"), "{text}");
    assert!(text.contains("isolated by: production/allow-from-ingress-nginx, production/default-deny-all"), "{text}");
    assert!(
        text.contains("namespace develop needs kubernetes.io/metadata.name=ingress-nginx but has kubernetes.io/metadata.name=develop"),
        "{text}"
    );
    assert!(text.contains(
        "production/default-deny-all isolates production/api for ingress and allows no ingress at all (default deny)"
    ));
    assert!(text.contains("suggested minimal policy (checked: it allows exactly this flow)"), "{text}");
    assert!(!text.contains("pod-template-hash"), "suggestions select stable labels only:\n{text}");
}

#[test]
fn explain_json_for_an_allowed_flow_names_the_rule() {
    let out = netiso(&[
        "explain",
        "--manifests",
        &fixture(),
        "--from",
        "ingress-nginx/controller",
        "--to",
        "production/api",
        "--port",
        "8080",
        "-o",
        "json",
    ]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"], "allowed");
    assert_eq!(v["ingress"]["allowed_by"][0]["policy"]["name"], "allow-from-ingress-nginx");
    assert_eq!(v["egress"]["isolated"], false);
    assert!(v.get("suggestion").is_none());
}

#[test]
fn explain_batch_answers_every_line_in_order_and_survives_a_bad_one() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_netiso"))
        .args(["explain", "--manifests", &fixture(), "--traffic", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input = concat!(
        r#"{"from": "develop/debug", "to": "kube-system/coredns", "port": 53, "protocol": "UDP"}"#,
        "\n",
        "this is not json\n",
        r#"{"from": {"ip": "203.0.113.5"}, "to": "production/api", "port": 8080}"#,
        "\n",
        r#"{"from": "nope/missing", "to": "production/api", "port": 8080}"#,
        "\n",
        r#"{"from": "10.244.0.40", "to": "fd00:10:244::30", "port": 8080, "protocol": "TCP"}"#,
        "\n",
    );
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["verdict"], "allowed");
    assert_eq!(lines[1]["line"], 2);
    assert!(lines[1]["error"].as_str().unwrap().contains("not a traffic line"));
    assert_eq!(lines[2]["verdict"], "denied");
    assert_eq!(lines[2]["flow"]["from"]["ip"], "203.0.113.5");
    assert!(lines[3]["error"].as_str().unwrap().contains("no pod nope/missing"));
    assert_eq!(lines[4]["verdict"], "allowed", "addresses resolve to the pods holding them");
    assert_eq!(lines[4]["flow"]["from"]["pod"], "controller");
}

#[test]
fn explain_fails_clearly_when_the_manifests_cannot_be_read() {
    let out = netiso(&["explain", "--manifests", "/nonexistent/dir", "--from", "a/b", "--to", "c/d", "--port", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("/nonexistent/dir"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "kind: NetworkPolicy\nmetadata: {name: x, namespace: y}\nspec: {podSelector: 7}\n").unwrap();
    let out = netiso(&["explain", "--manifests", bad.to_str().unwrap(), "--from", "a/b", "--to", "c/d", "--port", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("bad.yaml: document 1: NetworkPolicy y/x: field spec.podSelector"), "{err}");
}

/// The course's namespaces and pods without their policies, and production's baseline as a
/// kustomization of the repository's base policies: what `--policies`/`--manifests` get when
/// pointed at a Flux path.
fn course_with_kustomized_production(dir: &std::path::Path) {
    let course = std::fs::read_to_string(fixture()).unwrap();
    let without_policies: Vec<&str> =
        course.split("\n---").filter(|doc| !doc.contains("kind: NetworkPolicy")).collect();
    std::fs::write(dir.join("cluster.yaml"), without_policies.join("\n---")).unwrap();
    let overlay = dir.join("production");
    std::fs::create_dir(&overlay).unwrap();
    let base = format!("{}/../deploy/network-policies/base", env!("CARGO_MANIFEST_DIR"));
    let mut resources = String::new();
    for file in ["default-deny.yaml", "allow-dns.yaml", "allow-ingress-nginx.yaml"] {
        std::fs::copy(format!("{base}/{file}"), overlay.join(file)).unwrap();
        resources.push_str(&format!("  - {file}\n"));
    }
    std::fs::write(overlay.join("kustomization.yaml"), format!("namespace: production\nresources:\n{resources}"))
        .unwrap();
}

#[test]
fn a_kustomization_is_rendered_as_flux_renders_it() {
    let dir = tempfile::tempdir().unwrap();
    course_with_kustomized_production(dir.path());
    let explain = |path: &str| {
        Command::new(env!("CARGO_BIN_EXE_netiso"))
            .args(["explain", "--manifests", dir.path().to_str().unwrap(), "--from", "develop/debug", "--to"])
            .args(["production/api", "--port", "8080"])
            .env("PATH", path)
            .output()
            .unwrap()
    };
    // kubectl from scripts/setup first, then whatever the PATH has.
    let path = format!("/opt/netiso-tools:{}", std::env::var("PATH").unwrap_or_default());
    let out = explain(&path);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("isolated by: production/allow-from-ingress-nginx, production/default-deny-all"), "{text}");

    // Without kubectl or kustomize: an error that says what to install, not an empty policy set.
    let out = explain("/nonexistent");
    assert!(
        failed_naming(&out, &["production is a kustomization", "needs kubectl (`kubectl kustomize`) or kustomize"]),
        "{out:?}"
    );
    // A kustomization kustomize refuses: its own message, naming the directory.
    std::fs::write(dir.path().join("production/kustomization.yaml"), "resources: [missing.yaml]\n").unwrap();
    let out = explain(&path);
    assert!(failed_naming(&out, &["production: kustomize could not render it", "missing.yaml"]), "{out:?}");
}

#[test]
fn run_refuses_an_unknown_interface_before_loading_anything() {
    let out = netiso(&["run", "--interfaces", "nosuch0"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("no interface named `nosuch0`"), "{err}");
}

#[test]
fn run_names_the_missing_capabilities() {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            env!("CARGO_BIN_EXE_netiso"),
            "run",
        ])
        .output()
        .expect("setpriv (util-linux) runs");
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("lacks CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"), "{err}");
}

#[test]
fn run_refuses_to_publish_a_ca_it_does_not_have_before_loading_anything() {
    let cases = [
        (&["--api-auth", "none"][..], "--publish-api-ca needs --api-auth kubernetes"),
        (
            &["--api-auth", "kubernetes", "--tls-cert", "/nonexistent/tls.crt", "--tls-key", "/nonexistent/tls.key"][..],
            "with --tls-cert, give clients your CA with --ca-file",
        ),
    ];
    for (args, message) in cases {
        let out = netiso(&[&["run", "--publish-api-ca", "netiso/netiso-api-ca"][..], args].concat());
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(message), "{err}");
    }
    let out = netiso(&["run", "--publish-api-ca", "Not/A/Name"]);
    assert!(String::from_utf8(out.stderr).unwrap().contains("is not a ConfigMap name"));
}

#[test]
fn run_rejects_an_unknown_drop_reason_name() {
    let out = netiso(&["run", "--drop-reasons", "NETFLITER_DROP"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("unknown drop reason or class `NETFLITER_DROP`"), "{err}");
}

/// A server that is not a netiso API (a login page, a proxy's error page): answers every request
/// with `body` as `content_type` and closes. Returns its URL.
fn foreign_server(content_type: &'static str, body: &'static str) -> String {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let mut stream = &stream;
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

fn failed_naming(out: &Output, words: &[&str]) -> bool {
    let stderr = String::from_utf8_lossy(&out.stderr);
    !out.status.success() && words.iter().all(|w| stderr.contains(w))
}

#[test]
fn observe_and_evidence_fail_naming_the_server_and_what_it_answered() {
    let login = foreign_server("text/html", "<html><body>please log in</body></html>\n");
    for args in [
        &["observe", "--server", &login][..],
        &["observe", "-f", "--server", &login],
        &["evidence", "42", "--server", &login],
    ] {
        let out = netiso(args);
        assert!(failed_naming(&out, &[&login, "please log in"]), "{args:?}: {out:?}");
    }
    let unreachable = netiso(&["observe", "-f", "--server", "http://127.0.0.1:9"]);
    assert!(failed_naming(&unreachable, &["http://127.0.0.1:9"]), "{unreachable:?}");

    // A daemon that restarts mid-stream: the record it sent is shown, and the end is a failure.
    let record = r#"{"id":"7","time":"2026-12-05T04:17:21Z","last_seen":"2026-12-05T04:17:21Z","node":"n1","verdict":"dropped","protocol":"TCP","source":{"kind":"pod","namespace":"develop","pod":"debug","workload":null,"ip":"10.244.0.10","port":40009},"destination":{"kind":"pod","namespace":"production","pod":"api","workload":null,"ip":"10.244.0.30","port":8080},"reason":"NETFILTER_DROP","packets":1,"bytes":60,"policy":{"verdict":"denied","direction":"both","attribution":"denied_by_network_policy","policies":[],"summary":""}}
"#;
    let restarting = foreign_server("application/x-ndjson", record);
    let out = netiso(&["observe", "-f", "-o", "json", "--server", &restarting]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(r#""id":"7""#), "{out:?}");
    assert!(failed_naming(&out, &[&restarting, "ended"]), "{out:?}");
}
