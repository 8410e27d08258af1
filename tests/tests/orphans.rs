//! Device keys a crash left half-made or half-deleted, against the real `keywardd` on a real
//! SoftHSM token: at the next start the daemon destroys the key pair an unfinished `CreateKey`
//! made and finishes an unfinished `DeleteKey`, audits what it did, and touches nothing else on
//! the token — not the keys other applications keep there, not even one that carries the same
//! label as ours.
//!
//! The crash window is made exactly, without timing: either by writing, with the daemon
//! stopped, what a crash leaves (the key pair on the token, the intent in the store), or by
//! holding the database's write lock while a real `CreateKey` runs, so the daemon is stopped
//! between the token's step and the store's, and killing it there.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use keyward_tests::keywardd::{has_field, Keywardd, Setup};
use keyward_tests::softhsm::{SoftHsm, TokenObject};

fn world() -> (SoftHsm, Keywardd) {
    let token = SoftHsm::new("keyward-orphans");
    let d = Setup::new().token("hsm", &token).start();
    d.json(&["init", "--pkcs11", "hsm"]);
    (token, d)
}

fn database(d: &Keywardd) -> PathBuf {
    d.dir().join("state").join("keyward.db")
}

fn create_key(d: &Keywardd, name: &str, algorithm: &str) {
    let out = d.run(
        &[
            "key",
            "create",
            name,
            "--device",
            "hsm",
            "--algorithm",
            algorithm,
        ],
        b"",
    );
    assert_eq!(out.code, 0, "create {name}: {}", out.stderr);
}

fn key_names(d: &Keywardd) -> Vec<String> {
    let keys = d.json(&["key", "list"]);
    keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap().to_owned())
        .collect()
}

fn intents(d: &Keywardd) -> i64 {
    let db = rusqlite::Connection::open(database(d)).unwrap();
    db.query_row("SELECT count(*) FROM key_intents", [], |r| r.get(0))
        .unwrap()
}

fn labelled<'a>(objects: &'a [TokenObject], label: &str) -> Vec<&'a TokenObject> {
    objects.iter().filter(|o| o.label == label).collect()
}

fn sweep_records(d: &Keywardd) -> Vec<String> {
    std::fs::read_to_string(d.dir().join("state").join("audit.log"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("key-sweep"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn an_unfinished_create_is_swept_at_start_and_nothing_else_is_touched() {
    let (token, mut d) = world();
    create_key(&d, "kept", "ecdsa-p256");
    d.stop();
    let before = token.objects();
    assert_eq!(labelled(&before, "kept").len(), 2, "{before:?}");

    // What a crash between the token's step and the store's leaves: the key pair on the token
    // under the label and id the daemon chose, and the intent in the store.
    let id = "5eed00112233445566778899aabbccdd";
    token.keypair_as_another_app("orphan", id);
    // Other applications' keys on the same token: one under a label of its own, one that
    // happens to use the label Keyward gives the key (but not its id).
    token.keypair_as_another_app("payroll-signing", "01");
    token.keypair_as_another_app("orphan", "02");
    {
        let db = rusqlite::Connection::open(database(&d)).unwrap();
        let id_bytes: Vec<u8> = (0..id.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&id[i..i + 2], 16).unwrap())
            .collect();
        db.execute(
            "INSERT INTO key_intents (name, action, device, algorithm, object_id, created)
             VALUES ('orphan', 'create', 'hsm', 'ecdsa-p256', ?1, '2026-12-04T12:00:00Z')",
            [id_bytes],
        )
        .unwrap();
    }
    assert_eq!(token.objects().iter().filter(|o| o.id == id).count(), 2);

    d.start();
    let after = token.objects();
    assert!(
        after.iter().all(|o| o.id != id),
        "the orphan key pair is still on the token: {after:?}"
    );
    for object in &before {
        assert!(after.contains(object), "{object:?} was touched: {after:?}");
    }
    for foreign in ["01", "02"] {
        assert_eq!(
            after.iter().filter(|o| o.id == foreign).count(),
            2,
            "another application's key {foreign} was touched: {after:?}"
        );
    }
    assert_eq!(intents(&d), 0, "the intent is still recorded");
    let records = sweep_records(&d);
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(
        records[0].contains("orphan") && records[0].contains(id),
        "{records:?}"
    );
    assert!(d.log().contains("unfinished create of key"), "{}", d.log());

    // The name is free again, and the new key is the daemon's own.
    create_key(&d, "orphan", "ed25519");
    assert_eq!(key_names(&d), ["kept", "orphan"]);
    let now = token.objects();
    assert_eq!(labelled(&now, "orphan").len(), 4, "{now:?}");
    let out = d.run(&["key", "sign", "orphan"], b"after the sweep");
    assert_eq!(out.code, 0, "{}", out.stderr);
}

#[test]
fn an_unfinished_delete_is_finished_at_start() {
    let (token, mut d) = world();
    create_key(&d, "doomed", "ecdsa-p256");
    create_key(&d, "kept", "ecdsa-p256");
    d.stop();
    assert_eq!(labelled(&token.objects(), "doomed").len(), 2);
    {
        let db = rusqlite::Connection::open(database(&d)).unwrap();
        db.execute(
            "INSERT INTO key_intents (name, action, device, algorithm, object_id, created)
             VALUES ('doomed', 'delete', 'hsm', 'ecdsa-p256', NULL, '2026-12-04T12:00:00Z')",
            [],
        )
        .unwrap();
    }

    d.start();
    assert_eq!(key_names(&d), ["kept"]);
    let after = token.objects();
    assert!(labelled(&after, "doomed").is_empty(), "{after:?}");
    assert_eq!(labelled(&after, "kept").len(), 2, "{after:?}");
    assert_eq!(intents(&d), 0);
    let records = sweep_records(&d);
    assert!(
        records.len() == 1 && records[0].contains("doomed"),
        "{records:?}"
    );
}

/// A real `CreateKey` stopped by SIGKILL after the token made the key and before the store
/// recorded it. The database's write lock, taken by this test once the intent is on record,
/// holds the daemon at exactly that point: the token's key pair appears, the record can't.
///
/// RSA-3072 key generation takes about a second on SoftHSM: time enough to take the lock after
/// the intent is committed and before the key row is written. A round where the daemon was
/// quicker anyway (the key got recorded) proves nothing and is not counted; a few rounds of
/// each kind are bounded.
#[test]
fn a_create_killed_between_token_and_store_leaves_nothing_after_restart() {
    const KILLS: usize = 3;
    let (token, mut d) = world();
    create_key(&d, "kept", "ed25519");
    let mut recorded = vec!["kept".to_owned()];
    let mut kills = 0;
    for round in 0..2 * KILLS {
        if kills == KILLS {
            break;
        }
        let name = format!("crash-{round}");
        let mark = d.log_mark();
        let mut create = d
            .cli()
            .args([
                "key",
                "create",
                &name,
                "--device",
                "hsm",
                "--algorithm",
                "rsa-pss-3072",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut db = rusqlite::Connection::open(database(&d)).unwrap();
        db.busy_timeout(Duration::from_secs(30)).unwrap();
        d.wait_log("the create intent", mark, Duration::from_secs(30), |l| {
            l.contains("create intent recorded") && has_field(l, "key", &name)
        });
        let lock = db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        let missed: bool = lock
            .query_row(
                "SELECT count(*) > 0 FROM keys WHERE name = ?1",
                [&name],
                |r| r.get(0),
            )
            .unwrap();
        if missed {
            drop(lock);
            assert!(create.wait().unwrap().success(), "round {round}");
            recorded.push(name);
            continue;
        }
        // Once the token has made the key, the daemon says so and its next step is the key
        // row, which the lock holds up. (Watching the token itself instead would race
        // SoftHSM's own files: a second process that reads a token while another writes it
        // can fail either one.)
        d.wait_log(
            "the device to make the key",
            mark,
            Duration::from_secs(60),
            |l| l.contains("the device made the key") && has_field(l, "key", &name),
        );
        if let Some(status) = create.try_wait().unwrap() {
            panic!(
                "round {round}: the create ended ({status}) under the lock; log:\n{}",
                d.log()
            );
        }
        d.kill();
        drop(lock);
        let _ = create.wait();
        kills += 1;
        let made = token.objects();
        assert_eq!(
            labelled(&made, &name).len(),
            2,
            "round {round}: the key pair was made before the kill: {made:?}"
        );
        let id = labelled(&made, &name)[0].id.clone();

        d.start();
        let after = token.objects();
        assert!(
            labelled(&after, &name).is_empty() && after.iter().all(|o| o.id != id),
            "round {round}: the key pair of the killed create is still there: {after:?}"
        );
        assert_eq!(key_names(&d), recorded, "round {round}");
        assert_eq!(intents(&d), 0, "round {round}");
        // Every key-labelled pair on the token is a recorded key's.
        let mut on_token: Vec<_> = after
            .iter()
            .filter(|o| o.label == "kept" || o.label.starts_with("crash-"))
            .map(|o| o.label.clone())
            .collect();
        on_token.sort();
        on_token.dedup();
        assert_eq!(on_token, recorded, "round {round}: {after:?}");
    }
    assert_eq!(kills, KILLS, "the daemon outran the lock in most rounds");
}
