//! Who a caller is, against the real daemon: a process is put in real cgroups laid out as
//! systemd lays them out, drops to an unprivileged uid, and calls over Varlink (the real
//! `keyward` CLI) and D-Bus (`dbus-send` on a private `dbus-daemon`). A policy rule
//! `unit = "postgresql.service"` must hold for the system's `postgresql.service` and never for
//! a unit of that name that a user started under their own service manager
//! (`user@UID.service/app.slice/postgresql.service`): that caller is `user@UID.service`, in
//! the decision and in the audit log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keyward_tests::cgroup::CgroupTree;
use keyward_tests::dbus::PrivateBus;
use keyward_tests::keywardd::{bin, run_cli, Keywardd, Output, Setup, ROOT_ADMIN_POLICY};
use keyward_tests::softhsm::SoftHsm;
use serde_json::Value;

/// The unprivileged caller (`nobody`).
const UID: u32 = 65534;

const SECRET: &str = "db/password";
const VALUE: &[u8] = b"correct horse";

/// Root may do everything; the unit `postgresql.service` may read `db/*`.
fn policy() -> String {
    format!(
        r#"{ROOT_ADMIN_POLICY}
[[rule]]
who = {{ unit = "postgresql.service" }}
allow = ["read"]
secrets = ["db/*"]
"#
    )
}

/// The outcome record of the last `op` call by [`UID`] (not its `started` record).
fn last_outcome(d: &Keywardd, op: &str) -> Value {
    d.audit_requests()
        .into_iter()
        .rev()
        .find(|r| r["op"] == op && r["caller"]["uid"] == UID && r["result"] != "started")
        .unwrap_or_else(|| panic!("no {op} by uid {UID} on record; log:\n{}", d.log()))
}

/// `keyward secret get` as [`UID`] from inside `cgroup`.
fn get_over_varlink(d: &Keywardd, cgroup: &CgroupTree) -> Output {
    let mut c = cgroup.command_as(UID, &bin("keyward"));
    c.arg("--socket")
        .arg(d.socket())
        .args(["secret", "get", SECRET])
        .env_remove("KEYWARD_SOCKET");
    run_cli(&mut c, b"")
}

/// `GetSecret` over D-Bus (`dbus-send`, which prints error names) as [`UID`] from inside
/// `cgroup`.
fn get_over_dbus(bus: &PrivateBus, cgroup: &CgroupTree) -> Output {
    let mut c = cgroup.command_as(UID, std::path::Path::new("dbus-send"));
    c.arg(format!("--bus={}", bus.address()))
        .args([
            "--print-reply",
            "--dest=org.keyward.Custodian1",
            "/org/keyward/Custodian1",
            "org.keyward.Custodian1.GetSecret",
        ])
        .arg(format!("string:{SECRET}"))
        .arg("uint64:0");
    run_cli(&mut c, b"")
}

/// The caller's unit and transport on an audit record.
fn unit_via(record: &Value) -> (String, String) {
    (
        record["caller"]["unit"]
            .as_str()
            .unwrap_or("(none)")
            .to_owned(),
        record["caller"]["via"].as_str().unwrap_or("").to_owned(),
    )
}

#[test]
fn a_unit_a_user_names_under_their_own_manager_is_not_the_system_unit() {
    let user_unit =
        format!("user.slice/user-{UID}.slice/user@{UID}.service/app.slice/postgresql.service");
    let manager = format!("user@{UID}.service");
    // The user's manager subtree is the user's, as systemd delegates it.
    let user_cgroup = match CgroupTree::create(&user_unit, Some((&manager, UID))) {
        Ok(t) => t,
        Err(why) => {
            eprintln!("\n*** SKIPPED: cannot build the cgroup tree this test needs: {why} ***\n");
            return;
        }
    };
    let system_cgroup = CgroupTree::create("system.slice/postgresql.service", None).unwrap();

    let token = SoftHsm::new("keyward-identity");
    let bus = PrivateBus::start();
    let d = Setup::new()
        .token("hsm", &token)
        .dbus_address(bus.address())
        .public_socket()
        .policy(&policy())
        .start();
    let out = d.run(&["init", "--pkcs11", "hsm"], b"");
    assert_eq!(out.code, 0, "init: {}", out.stderr);
    let out = d.run(&["secret", "put", SECRET], VALUE);
    assert_eq!(out.code, 0, "put: {}", out.stderr);

    // The system's postgresql.service, even as nobody, reads: the rule works.
    let out = get_over_varlink(&d, &system_cgroup);
    assert_eq!(out.code, 0, "system unit over Varlink: {}", out.stderr);
    assert_eq!(out.stdout_bytes, VALUE);
    let r = last_outcome(&d, "GetSecret");
    assert_eq!(
        (unit_via(&r), r["result"].as_str().unwrap()),
        (("postgresql.service".into(), "varlink".into()), "ok"),
        "{r}"
    );
    let out = get_over_dbus(&bus, &system_cgroup);
    assert_eq!(out.code, 0, "system unit over D-Bus: {}", out.stderr);
    let r = last_outcome(&d, "GetSecret");
    assert_eq!(
        (unit_via(&r), r["result"].as_str().unwrap()),
        (("postgresql.service".into(), "dbus".into()), "ok"),
        "{r}"
    );

    // The same uid in a "postgresql.service" of its own manager: refused on both transports,
    // and on record as the manager it runs under.
    let out = get_over_varlink(&d, &user_cgroup);
    assert_eq!(
        out.code, 1,
        "a user's own postgresql.service read the system's secret over Varlink: {:?} {}",
        out.stdout, out.stderr
    );
    assert!(out.stderr.contains("permission denied"), "{}", out.stderr);
    assert!(out.stdout_bytes.is_empty());
    let r = last_outcome(&d, "GetSecret");
    assert_eq!(
        (unit_via(&r), r["result"].as_str().unwrap()),
        ((manager.clone(), "varlink".into()), "PermissionDenied"),
        "{r}"
    );

    let out = get_over_dbus(&bus, &user_cgroup);
    assert_ne!(
        out.code, 0,
        "a user's own postgresql.service read the system's secret over D-Bus: {}",
        out.stdout
    );
    assert!(
        out.stderr
            .contains("org.keyward.Custodian1.Error.PermissionDenied"),
        "{}",
        out.stderr
    );
    let r = last_outcome(&d, "GetSecret");
    assert_eq!(
        (unit_via(&r), r["result"].as_str().unwrap()),
        ((manager, "dbus".into()), "PermissionDenied"),
        "{r}"
    );
}
