//! Tests of the store: migrations, durability across reopen, the secret version counter, literal
//! prefix listing, rollback, concurrent reads, refusal of newer schemas, file mode.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;

use keyward_proto::kinds::{KeyAlgorithm, KeyslotKind};

use super::tables::{self, KeyRow, Meta, NewKeyslot, SecretRow};
use super::{schema, Store, StoreError};

fn temp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyward.db");
    (dir, path)
}

fn meta() -> Meta {
    Meta {
        vault_id: [7; 16],
        created: tables::now_rfc3339(),
        keyring: vec![1, 2, 3],
        keyring_term: 1,
    }
}

fn slot(kind: KeyslotKind) -> NewKeyslot {
    NewKeyslot {
        kind,
        device: Some("tpm".into()),
        pcrs: Some(vec![7, 11]),
        pin: true,
        threshold: None,
        shares: None,
        blob: vec![9; 40],
        unconfirmed_until: None,
    }
}

fn key(name: &str) -> KeyRow {
    KeyRow {
        name: name.into(),
        device: "hsm".into(),
        algorithm: KeyAlgorithm::Ed25519,
        handle: b"{\"id\":\"01\"}".to_vec(),
        public_key: vec![0x30, 0x2a],
        created: tables::now_rfc3339(),
    }
}

/// Put a new version of `name` the way the vault does: reserve, then insert.
async fn put(store: &Store, name: &str, ciphertext: &[u8]) -> u64 {
    let name = name.to_owned();
    let ciphertext = ciphertext.to_vec();
    store
        .write(move |tx| {
            let version = tables::next_secret_version(tx, &name)?;
            tables::insert_secret(
                tx,
                &SecretRow {
                    name,
                    version,
                    term: 1,
                    ciphertext,
                    created: tables::now_rfc3339(),
                },
            )?;
            Ok(version)
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn migrates_from_empty() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let (version, app, journal, tables_n) = store
        .read(|c| {
            let v: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
            let a: i32 = c.pragma_query_value(None, "application_id", |r| r.get(0))?;
            let j: String = c.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
            let n: i64 = c.query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'table'
                 AND name IN ('meta', 'keyslots', 'secrets', 'secret_names', 'keys')",
                [],
                |r| r.get(0),
            )?;
            Ok((v, a, j, n))
        })
        .await
        .unwrap();
    assert_eq!(version, schema::current_version());
    assert_eq!(app, schema::APPLICATION_ID);
    assert_eq!(journal, "wal");
    assert_eq!(tables_n, 5);
    assert_eq!(store.read(tables::get_meta).await.unwrap(), None);
    assert_eq!(store.read(tables::count_secrets).await.unwrap(), 0);
}

#[tokio::test]
async fn reopen_keeps_data() {
    let (_dir, path) = temp();
    {
        let store = Store::open(&path).unwrap();
        store
            .write(|tx| {
                tables::insert_meta(tx, &meta())?;
                tables::insert_keyslot(tx, &slot(KeyslotKind::Tpm2))?;
                tables::insert_key(tx, &key("signer"))
            })
            .await
            .unwrap();
        put(&store, "db/password", b"ct-1").await;
    }
    let store = Store::open(&path).unwrap();
    let m = store.read(tables::get_meta).await.unwrap().unwrap();
    assert_eq!(m.vault_id, [7; 16]);
    assert_eq!(m.keyring, [1, 2, 3]);
    let slots = store.read(tables::list_keyslots).await.unwrap();
    assert_eq!(slots.len(), 1);
    assert_eq!(slots[0].pcrs, Some(vec![7, 11]));
    assert!(slots[0].pin);
    let s = store
        .read(|c| tables::get_secret(c, "db/password", None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((s.version, s.ciphertext.as_slice()), (1, &b"ct-1"[..]));
    assert_eq!(
        store.read(|c| tables::get_key(c, "signer")).await.unwrap(),
        Some(key_with_created(
            &store.read(tables::list_keys).await.unwrap()[0].created
        ))
    );
}

fn key_with_created(created: &str) -> KeyRow {
    KeyRow {
        created: created.into(),
        ..key("signer")
    }
}

#[tokio::test]
async fn meta_once_and_keyring_updates() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let e = store
        .write(|tx| tables::update_keyring(tx, b"x", 2))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
    store
        .write(|tx| tables::insert_meta(tx, &meta()))
        .await
        .unwrap();
    let e = store
        .write(|tx| tables::insert_meta(tx, &meta()))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::VaultExists), "{e}");
    store
        .write(|tx| tables::update_keyring(tx, b"new", 2))
        .await
        .unwrap();
    let m = store.read(tables::get_meta).await.unwrap().unwrap();
    assert_eq!((m.keyring.as_slice(), m.keyring_term), (&b"new"[..], 2));
}

#[tokio::test]
async fn keyslot_ids_are_never_reused() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let (a, b) = store
        .write(|tx| {
            Ok((
                tables::insert_keyslot(tx, &slot(KeyslotKind::Tpm2))?,
                tables::insert_keyslot(tx, &slot(KeyslotKind::Pkcs11))?,
            ))
        })
        .await
        .unwrap();
    assert_eq!((a.id, b.id), (1, 2));
    assert!(store
        .write(move |tx| tables::delete_keyslot(tx, 2))
        .await
        .unwrap());
    assert!(!store
        .write(move |tx| tables::delete_keyslot(tx, 2))
        .await
        .unwrap());
    let c = store
        .write(|tx| {
            tables::insert_keyslot(
                tx,
                &NewKeyslot {
                    kind: KeyslotKind::Recovery,
                    device: None,
                    pcrs: None,
                    pin: false,
                    threshold: Some(2),
                    shares: Some(3),
                    blob: b"{}".to_vec(),
                    unconfirmed_until: None,
                },
            )
        })
        .await
        .unwrap();
    assert_eq!(c.id, 3);
    store
        .write(|tx| tables::update_keyslot_blob(tx, 1, b"rekeyed"))
        .await
        .unwrap();
    let e = store
        .write(|tx| tables::update_keyslot_blob(tx, 2, b"gone"))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound { .. }));
    let one = store
        .read(|c| tables::get_keyslot(c, 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(one.blob, b"rekeyed");
    let three = store
        .read(|c| tables::get_keyslot(c, 3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (three.threshold, three.shares, three.pcrs),
        (Some(2), Some(3), None)
    );
    assert_eq!(
        store.read(|c| tables::get_keyslot(c, 2)).await.unwrap(),
        None
    );
    let ids: Vec<u32> = store
        .read(tables::list_keyslots)
        .await
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, [1, 3]);
}

#[tokio::test]
async fn secret_versions_never_repeat_after_delete() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    assert_eq!(put(&store, "app/token", b"a").await, 1);
    assert_eq!(put(&store, "app/token", b"b").await, 2);
    assert_eq!(put(&store, "other", b"c").await, 1);
    let latest = store
        .read(|c| tables::get_secret(c, "app/token", None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (latest.version, latest.ciphertext.as_slice()),
        (2, &b"b"[..])
    );
    let first = store
        .read(|c| tables::get_secret(c, "app/token", Some(1)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.ciphertext, b"a");
    assert_eq!(
        store
            .read(|c| tables::get_secret(c, "app/token", Some(u64::MAX)))
            .await
            .unwrap(),
        None
    );
    let versions = store
        .read(|c| tables::secret_versions(c, "app/token"))
        .await
        .unwrap();
    assert_eq!(
        versions.iter().map(|v| (v.0, v.1)).collect::<Vec<_>>(),
        [(1, 1), (2, 1)]
    );
    assert_eq!(store.read(tables::count_secrets).await.unwrap(), 2);

    assert!(store
        .write(|tx| tables::delete_secret(tx, "app/token"))
        .await
        .unwrap());
    assert!(!store
        .write(|tx| tables::delete_secret(tx, "app/token"))
        .await
        .unwrap());
    assert_eq!(
        store
            .read(|c| tables::get_secret(c, "app/token", None))
            .await
            .unwrap(),
        None
    );
    assert!(store
        .read(|c| tables::secret_versions(c, "app/token"))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store
            .read(|c| tables::list_secret_names(c, None))
            .await
            .unwrap(),
        ["other"]
    );
    assert_eq!(store.read(tables::count_secrets).await.unwrap(), 1);
    // The counter survived the delete.
    assert_eq!(put(&store, "app/token", b"d").await, 3);
}

#[tokio::test]
async fn unreserved_versions_are_refused() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    put(&store, "s", b"a").await;
    for version in [1, 2] {
        let e = store
            .write(move |tx| {
                tables::insert_secret(
                    tx,
                    &SecretRow {
                        name: "s".into(),
                        version,
                        term: 1,
                        ciphertext: vec![],
                        created: tables::now_rfc3339(),
                    },
                )
            })
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Conflict(_)), "{version}: {e}");
    }
}

#[tokio::test]
async fn prefix_listing_is_literal() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    for name in ["a%b", "a%bc", "a_b", "axb", "ab", "b", "A%b"] {
        put(&store, name, b"x").await;
    }
    let list = |prefix: Option<&'static str>| {
        let store = store.clone();
        async move {
            store
                .read(move |c| tables::list_secret_names(c, prefix))
                .await
                .unwrap()
        }
    };
    assert_eq!(list(Some("a%")).await, ["a%b", "a%bc"]);
    assert_eq!(list(Some("a_")).await, ["a_b"]);
    assert_eq!(list(Some("a")).await, ["a%b", "a%bc", "a_b", "ab", "axb"]);
    assert_eq!(list(Some("%")).await, Vec::<String>::new());
    assert_eq!(list(Some("")).await.len(), 7);
    assert_eq!(list(None).await.len(), 7);
}

#[tokio::test]
async fn keys_are_unique_by_name() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    store
        .write(|tx| tables::insert_key(tx, &key("k")))
        .await
        .unwrap();
    let e = store
        .write(|tx| tables::insert_key(tx, &key("k")))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::AlreadyExists { kind: "key", name } if name == "k"),
        "{e}"
    );
    store
        .write(|tx| tables::insert_key(tx, &key("j")))
        .await
        .unwrap();
    let names: Vec<String> = store
        .read(tables::list_keys)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(names, ["j", "k"]);
    assert!(store.write(|tx| tables::delete_key(tx, "k")).await.unwrap());
    assert!(!store.write(|tx| tables::delete_key(tx, "k")).await.unwrap());
    assert_eq!(store.read(|c| tables::get_key(c, "k")).await.unwrap(), None);
}

fn intent(name: &str, action: tables::IntentAction) -> tables::KeyIntent {
    tables::KeyIntent {
        name: name.into(),
        action,
        device: "hsm".into(),
        algorithm: KeyAlgorithm::Ed25519,
        object_id: (action == tables::IntentAction::Create).then(|| vec![0xa5; 16]),
        created: tables::now_rfc3339(),
    }
}

#[tokio::test]
async fn key_intents_are_one_per_name_and_checked() {
    use tables::IntentAction::{Create, Delete};
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let k = intent("k", Create);
    let stored = k.clone();
    store
        .write(move |tx| tables::insert_key_intent(tx, &stored))
        .await
        .unwrap();
    let e = store
        .write(|tx| tables::insert_key_intent(tx, &intent("k", Delete)))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::AlreadyExists { kind: "key operation", name } if name == "k"),
        "{e}"
    );
    // A create must say which object it asked for; a delete names none.
    let mut bad = intent("j", Create);
    bad.object_id = None;
    let e = store
        .write(move |tx| tables::insert_key_intent(tx, &bad))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e}");
    store
        .write(|tx| tables::insert_key_intent(tx, &intent("j", Delete)))
        .await
        .unwrap();
    assert_eq!(
        store
            .read(|c| tables::get_key_intent(c, "k"))
            .await
            .unwrap(),
        Some(k)
    );
    let names: Vec<_> = store
        .read(tables::list_key_intents)
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.name, i.action))
        .collect();
    assert!(
        names.contains(&("j".into(), Delete)) && names.len() == 2,
        "{names:?}"
    );
    assert!(store
        .write(|tx| tables::delete_key_intent(tx, "k"))
        .await
        .unwrap());
    assert!(!store
        .write(|tx| tables::delete_key_intent(tx, "k"))
        .await
        .unwrap());
}

/// A database as an earlier build (schema v2) left it, with a vault and a key in it, takes the
/// v3 step (and every later one) and keeps everything.
#[tokio::test]
async fn migrates_v2_to_v3_keeping_the_data() {
    let (_dir, path) = temp();
    {
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        for step in &schema::MIGRATIONS[..2] {
            tx.execute_batch(step).unwrap();
        }
        tx.pragma_update(None, "user_version", 2).unwrap();
        tx.pragma_update(None, "application_id", schema::APPLICATION_ID)
            .unwrap();
        tx.execute(
            "INSERT INTO keys (name, device, algorithm, handle, public_key, created)
             VALUES ('old', 'hsm', 'ed25519', x'7b7d', x'302a', '2026-01-01T00:00:00Z')",
            [],
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let version: i64 = store
        .read(|c| Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?))
        .await
        .unwrap();
    assert_eq!(version, schema::current_version());
    let old = store
        .read(|c| tables::get_key(c, "old"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.handle, b"{}");
    assert!(store
        .read(tables::list_key_intents)
        .await
        .unwrap()
        .is_empty());
    store
        .write(|tx| tables::insert_key_intent(tx, &intent("old", tables::IntentAction::Delete)))
        .await
        .unwrap();
}

#[tokio::test]
async fn failed_write_is_rolled_back() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let e = store
        .write(|tx| {
            tables::insert_key(tx, &key("half"))?;
            tables::next_secret_version(tx, "half")?;
            Err::<(), _>(StoreError::Conflict("changed my mind".into()))
        })
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)));
    assert_eq!(
        store.read(|c| tables::get_key(c, "half")).await.unwrap(),
        None
    );
    // The reserved version was rolled back too.
    assert_eq!(put(&store, "half", b"x").await, 1);

    // A panicking closure is rolled back, and the writer survives it.
    let e = store
        .write(|tx| {
            tables::insert_key(tx, &key("boom"))?;
            let v: Vec<u8> = Vec::new();
            Ok(v[3])
        })
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Panicked), "{e}");
    assert_eq!(
        store.read(|c| tables::get_key(c, "boom")).await.unwrap(),
        None
    );
    store
        .write(|tx| tables::insert_key(tx, &key("after")))
        .await
        .unwrap();

    // A panicking read is reported, and reads keep working.
    let e = store
        .read(|_| -> Result<(), StoreError> {
            let v: Vec<u8> = Vec::new();
            let _ = v[3];
            Ok(())
        })
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Panicked), "{e}");
    for _ in 0..super::READERS + 1 {
        assert!(store
            .read(|c| tables::get_key(c, "after"))
            .await
            .unwrap()
            .is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_run_while_a_write_is_open() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    put(&store, "before", b"x").await;

    let (inside_tx, inside_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(move |tx| {
                    tables::insert_key(tx, &key("pending"))?;
                    let _ = inside_tx.send(());
                    // Hold the write transaction open until the reads below are done.
                    go_rx.recv().map_err(|_| StoreError::Closed)?;
                    Ok(())
                })
                .await
        })
    };
    inside_rx.await.unwrap();
    // The writer holds its transaction open: reads still run, concurrently, and see the last
    // committed state.
    let reads = (0..8).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .read(|c| Ok((tables::count_secrets(c)?, tables::get_key(c, "pending")?)))
                .await
        })
    });
    for read in reads.collect::<Vec<_>>() {
        let (count, pending) = read.await.unwrap().unwrap();
        assert_eq!((count, pending), (1, None));
    }
    go_tx.send(()).unwrap();
    writer.await.unwrap().unwrap();
    assert!(store
        .read(|c| tables::get_key(c, "pending"))
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn refuses_a_newer_schema() {
    let (_dir, path) = temp();
    drop(Store::open(&path).unwrap());
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    let e = Store::open(&path).unwrap_err();
    assert!(
        matches!(e, StoreError::TooNew { found: 99, known } if known == schema::current_version()),
        "{e}"
    );
    assert!(e.to_string().contains("newer"), "{e}");
}

#[tokio::test]
async fn refuses_a_foreign_database() {
    let (_dir, path) = temp();
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (x)").unwrap();
    }
    let e = Store::open(&path).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt(_)), "{e}");

    let (_dir2, path2) = temp();
    std::fs::write(
        &path2,
        b"this is not a database, not even a little bit".repeat(100),
    )
    .unwrap();
    let e = Store::open(&path2).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
}

#[tokio::test]
async fn files_are_private() {
    let (dir, path) = temp();
    let store = Store::open(&path).unwrap();
    put(&store, "x", b"y").await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    let wal = dir.path().join("keyward.db-wal");
    assert!(wal.exists());
    assert_eq!(mode(&wal), 0o600);

    // An existing file readable by others is tightened.
    let (_dir2, loose) = temp();
    std::fs::write(&loose, b"").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(Store::open(&loose).unwrap());
    assert_eq!(mode(&loose), 0o600);

    // No parent directory: a clear error, nothing created.
    let e = Store::open(&dir.path().join("missing/keyward.db")).unwrap_err();
    assert!(matches!(e, StoreError::Io { .. }), "{e}");
}

#[test]
fn store_is_clone_send_sync() {
    fn assert<T: Clone + Send + Sync + 'static>() {}
    assert::<Store>();
}

#[tokio::test]
async fn closes_when_the_last_handle_drops() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let clone = store.clone();
    drop(store);
    // A clone keeps the writer alive.
    put(&clone, "still", b"here").await;
    assert!(format!("{clone:?}").contains("keyward.db"));
}

#[tokio::test]
async fn the_probe_writes_nothing_and_waits_while_another_process_holds_the_write_lock() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    store.probe().await.unwrap();
    let wal = path.with_extension("db-wal");
    let before = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    for _ in 0..3 {
        store.probe().await.unwrap();
    }
    assert_eq!(
        std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0),
        before,
        "a probe wrote to the WAL"
    );

    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let mut probe = Box::pin(store.probe());
    let waited = tokio::time::timeout(std::time::Duration::from_millis(300), &mut probe).await;
    assert!(
        waited.is_err(),
        "the probe passed under another's write lock"
    );
    other.execute_batch("COMMIT").unwrap();
    probe.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_queued_together_commit_together_and_fail_alone() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    put(&store, "warm", b"x").await;
    let wal = path.with_extension("db-wal");
    let wal_len = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let page: u64 = store
        .read(|c| Ok(c.query_row("PRAGMA page_size", [], |r| r.get(0))?))
        .await
        .unwrap();
    let before = wal_len();

    // A write that holds the writer until told to finish: the writes queued meanwhile
    // are the next group.
    let (running, is_running) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let plug = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .write(move |_| {
                    let _ = running.send(());
                    let _ = released.recv();
                    Ok(())
                })
                .await
        }
    });
    tokio::task::spawn_blocking(move || is_running.recv())
        .await
        .unwrap()
        .unwrap();
    let mut calls = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        calls.push(tokio::spawn(async move {
            store
                .write(move |tx| {
                    tables::insert_key(tx, &key(&format!("k{i}")))?;
                    match i {
                        7 => Err(StoreError::Conflict("this one fails".into())),
                        13 => {
                            let v: Vec<u8> = Vec::new();
                            Ok(v[3])
                        }
                        _ => Ok(0),
                    }
                })
                .await
        }));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while store.inner.queue.capacity() > super::WRITE_QUEUE - 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writes never queued"
        );
        tokio::task::yield_now().await;
    }
    release.send(()).unwrap();
    plug.await.unwrap().unwrap();

    for (i, call) in calls.into_iter().enumerate() {
        let result = call.await.unwrap();
        let kept = store
            .read(move |c| tables::get_key(c, &format!("k{i}")))
            .await
            .unwrap()
            .is_some();
        match i {
            7 => assert!(matches!(result, Err(StoreError::Conflict(_))) && !kept),
            13 => assert!(matches!(result, Err(StoreError::Panicked)) && !kept),
            _ => assert!(result.is_ok() && kept, "write {i}: {result:?}"),
        }
    }
    // Eighteen commits of their own would have written at least eighteen WAL frames; the
    // group wrote the few pages it touched, once or twice.
    let frames = (wal_len() - before) / (page + 24);
    assert!(frames <= 8, "{frames} WAL frames for one group");
}

/// Transit key versions: stored per (name, version), the newest found, a version never
/// written twice.
#[tokio::test]
async fn transit_key_versions() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let row = |version| tables::TransitKeyRow {
        name: "bao".into(),
        version,
        term: 1,
        sealed: vec![version as u8; 56],
        created: tables::now_rfc3339(),
    };
    assert_eq!(
        store
            .read(|c| tables::latest_transit_version(c, "bao"))
            .await
            .unwrap(),
        None
    );
    for v in [1, 2] {
        store
            .write(move |tx| tables::insert_transit_key(tx, &row(v)))
            .await
            .unwrap();
    }
    let e = store
        .write(move |tx| tables::insert_transit_key(tx, &row(2)))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e}");
    let (latest, newest, first, missing) = store
        .read(|c| {
            Ok((
                tables::latest_transit_version(c, "bao")?,
                tables::get_transit_key(c, "bao", None)?,
                tables::get_transit_key(c, "bao", Some(1))?,
                tables::get_transit_key(c, "bao", Some(3))?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(latest, Some(2));
    assert_eq!(newest.unwrap().sealed, vec![2; 56]);
    assert_eq!(first.unwrap().sealed, vec![1; 56]);
    assert!(missing.is_none());
}

/// A snapshot taken while another task keeps committing is one moment of the database: the
/// rows it holds are exactly the first N written (rows go in one per commit, in order), and
/// the writer is never stopped by it (every write of the loop completes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_one_moment_while_writes_go_on() {
    let (dir, path) = temp();
    let store = Store::open(&path).unwrap();
    store
        .write(|tx| Ok(tx.execute_batch("CREATE TABLE t (n INTEGER NOT NULL)")?))
        .await
        .unwrap();
    const WRITES: i64 = 400;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for n in 0..WRITES {
                store
                    .write(move |tx| Ok(tx.execute("INSERT INTO t VALUES (?1)", [n])?))
                    .await
                    .unwrap();
            }
        })
    };
    let mut counts = Vec::new();
    for i in 0..8 {
        let copy = dir.path().join(format!("snapshot-{i}.db"));
        let version = store.snapshot(copy.clone()).await.unwrap();
        assert_eq!(version, schema::current_version());
        let conn = rusqlite::Connection::open(&copy).unwrap();
        let (count, max): (i64, Option<i64>) = conn
            .query_row("SELECT count(*), max(n) FROM t", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(max.map_or(0, |m| m + 1), count, "a torn snapshot");
        counts.push(count);
    }
    writer.await.unwrap();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    let total: i64 = store
        .read(|c| Ok(c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?))
        .await
        .unwrap();
    assert_eq!(total, WRITES);
}

/// The latest ciphertext of `name`, as a point lookup sees it.
fn latest(c: &rusqlite::Connection, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(tables::get_secret(c, name, None)?.map(|row| row.ciphertext))
}

/// A reader keeps its snapshot between reads only while nothing is committed: a read that
/// began before a write sees the state before it to its end, and the next read on the same
/// connection (the pool hands back the one returned last) sees the write.
#[tokio::test]
async fn a_read_after_a_commit_sees_it_though_its_reader_kept_a_snapshot() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    put(&store, "app/db", b"v1").await;
    let writer = store.clone();
    let during = store
        .read(move |c| {
            let before = latest(c, "app/db")?;
            // The write commits, on another thread, while this read's snapshot is open.
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap()
                    .block_on(put(&writer, "app/db", b"v2"))
            })
            .join()
            .unwrap();
            Ok((before, latest(c, "app/db")?))
        })
        .await
        .unwrap();
    assert_eq!(during, (Some(b"v1".to_vec()), Some(b"v1".to_vec())));
    for _ in 0..2 * super::READERS {
        assert_eq!(
            store.read_now(|c| latest(c, "app/db")).unwrap(),
            Some(b"v2".to_vec())
        );
    }
}

/// Idle readers' snapshots end at the next commit, so that they don't pin the WAL: with every
/// reader of the pool left holding one, a long run of writes still checkpoints and restarts
/// the WAL, which stays near its checkpoint size instead of growing with every write.
#[tokio::test]
async fn idle_readers_do_not_keep_the_wal_from_restarting() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    put(&store, "app/db", b"v1").await;
    // Every reader of the pool takes a snapshot (each nested read takes another reader) and
    // goes back to the pool with it.
    fn nested(store: &Store, depth: usize) -> Result<Option<Vec<u8>>, StoreError> {
        store.read_now(|c| match depth {
            0 => latest(c, "app/db"),
            _ => latest(c, "app/db").and(nested(store, depth - 1)),
        })
    }
    assert_eq!(
        nested(&store, super::READERS - 1).unwrap(),
        Some(b"v1".to_vec())
    );
    // 1500 writes of about three pages each: 18 MB of WAL if it never restarted, where a
    // checkpoint comes every 1000 pages (4 MB).
    let blob = vec![0x5a; 8 * 1024];
    for _ in 0..1500 {
        put(&store, "app/db", &blob).await;
    }
    let wal = std::fs::metadata(path.with_extension("db-wal"))
        .unwrap()
        .len();
    assert!(wal < 8 << 20, "the WAL grew to {wal} bytes");
    assert_eq!(store.read_now(|c| latest(c, "app/db")).unwrap(), Some(blob));
}

/// The bundled SQLite is built as `.cargo/config.toml` says: no process-wide mutex around
/// every allocation (memory statistics) and one page cache per connection (no shared cache
/// behind a mutex of its own). Readers on two threads contended on both.
#[test]
fn sqlite_is_built_without_process_wide_mutexes_on_the_read_path() {
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    let options: Vec<String> = conn
        .prepare("PRAGMA compile_options")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
        "{options:?}"
    );
    assert!(
        !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
        "{options:?}"
    );
}
