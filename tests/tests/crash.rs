//! Crash consistency: a write / enroll / rekey / rotate workload runs over the Varlink socket
//! against the real `keywardd` on a real swtpm and a real SoftHSM token, and `keywardd` is
//! killed with SIGKILL at random points, restarted, and checked, again and again.
//!
//! After every kill the daemon must start, open its store, and unseal on its own (from the TPM,
//! or from the token when no TPM slot is left); every acknowledged write must be there with
//! exactly its value and version; every acknowledged delete must stay deleted; a write that was
//! in flight when the kill landed must be either absent or whole (never garbage, never a
//! decrypt error); the keyslots must be the acknowledged ones (plus or minus the one in
//! flight); the recovery shares from the last acknowledged rekey or enroll must still open the
//! vault (tried after a `Seal` now and then); and secrets written under older terms must read
//! after rotations and rekeys. The audit log must agree with the store: every put and delete
//! that took effect on record exactly once, in commit order, and the chain verifying.
//!
//! The kill point is chosen in acknowledged operations, not in time: a seeded generator picks
//! after how many acknowledgements (counted across the workers) the main thread sends SIGKILL
//! while the workers keep calling. The seed is printed; `KEYWARD_CRASH_SEED` replays the same
//! kill points and operation sequences (thread interleaving differs from run to run).
//! `KEYWARD_CRASH_KILLS` sets the number of kills: a short run by default, `scripts/crash N`
//! for the long one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::pkcs8::DecodePublicKey as _;
use keyward::api::{
    ApiError, KeyAlgorithm, Keyslot, KeyslotKind, RekeyReply, SecretString, SlotSpec, UnsealParams,
};
use keyward::audit;
use keyward::varlink::{Client, ClientError};
use keyward_tests::keywardd::{Keywardd, Setup};
use keyward_tests::softhsm::SoftHsm;
use keyward_tests::swtpm::Swtpm;

/// Kills in the default (CI) run.
const DEFAULT_KILLS: usize = 20;
/// Environment: how many kills.
const KILLS_ENV: &str = "KEYWARD_CRASH_KILLS";
/// Environment: the seed to replay.
const SEED_ENV: &str = "KEYWARD_CRASH_SEED";
/// Secret-writing workers (the admin worker comes on top).
const WRITERS: usize = 2;
/// Names each writer owns (a name belongs to one writer, so its history is sequential).
const NAMES_PER_WRITER: usize = 6;
/// The kill lands after 1 to this many acknowledged operations into a round.
const MAX_OPS_BEFORE_KILL: u64 = 40;
/// Longest a call may take, or a round wait for its kill point, before the daemon is declared
/// hung.
const DEADLINE: Duration = Duration::from_secs(120);
/// Recovery shares per slot, and how many open it.
const SHARES: u8 = 3;
const THRESHOLD: u8 = 2;

// ---------------------------------------------------------------------------------------------
// A small deterministic generator (splitmix64): the run is replayable from one printed seed.

#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn fork(&mut self) -> Rng {
        Rng(self.next())
    }
}

// ---------------------------------------------------------------------------------------------
// Self-describing values: a value says which name and which put it was, and its filler is
// derived from both, so any read can be checked on its own, not only against the model.

fn value_of(name: &str, n: u64) -> Vec<u8> {
    let mut v = format!("{name}#{n}:").into_bytes();
    let mut x = Rng(name
        .bytes()
        .fold(n, |h, b| h.wrapping_mul(131).wrapping_add(u64::from(b))));
    let filler = 1 + x.below(1500);
    for _ in 0..filler {
        v.push(b'a' + (x.below(26) as u8));
    }
    v
}

/// The put counter a value was made from, if it is exactly `value_of(name, n)` for some `n`.
fn counter_of(name: &str, value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?;
    let rest = text.strip_prefix(name)?.strip_prefix('#')?;
    let n: u64 = rest.split(':').next()?.parse().ok()?;
    (value_of(name, n) == value).then_some(n)
}

// ---------------------------------------------------------------------------------------------
// What the harness knows.

/// One secret's acknowledged history since its last acknowledged delete: version -> value.
type Versions = BTreeMap<u64, Vec<u8>>;

/// An operation whose reply never came (the kill landed first).
#[derive(Clone, Debug)]
enum SecretOp {
    Put { name: String, value: Vec<u8> },
    Delete { name: String },
}

/// A writer's names and what it knows about them.
#[derive(Debug)]
struct Writer {
    names: BTreeMap<String, Versions>,
    /// Next put counter (values are `value_of(name, counter)`).
    counter: u64,
    in_flight: Option<SecretOp>,
    rng: Rng,
    /// Every put acknowledged (or, cut off by a kill, found committed after the restart):
    /// name and version. Each must be on record in the audit log exactly once.
    puts: Vec<(String, u64)>,
    /// Deletes acknowledged or found committed.
    deletes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot {
    kind: KeyslotKind,
    device: Option<String>,
}

#[derive(Clone, Debug)]
struct Key {
    algorithm: KeyAlgorithm,
    public: Vec<u8>,
}

#[derive(Clone, Debug)]
enum AdminOp {
    EnrollRecovery,
    EnrollTpm,
    Remove(u32),
    Rotate,
    Rekey,
    /// Type back `THRESHOLD` shares of every new set: of an enrolled slot, or a pending rekey's.
    Confirm(Vec<String>),
    CreateKey {
        name: String,
        device: String,
        algorithm: KeyAlgorithm,
    },
    DeleteKey(String),
}

/// The vault as the admin worker knows it.
#[derive(Debug)]
struct Admin {
    slots: BTreeMap<u32, Slot>,
    /// Recovery slot id -> its shares, when known (a slot enrolled or rekeyed by a call whose
    /// reply was lost has shares no one has seen).
    shares: BTreeMap<u32, Vec<String>>,
    /// The new shares of an acknowledged rekey, by recovery slot: not in force until
    /// confirmed (the old ones are).
    pending: Option<BTreeMap<u32, Vec<String>>>,
    /// Recovery slots whose shares are known but not yet confirmed.
    unconfirmed: BTreeSet<u32>,
    term: u32,
    keys: BTreeMap<String, Key>,
    key_counter: u64,
    in_flight: Option<AdminOp>,
    rng: Rng,
    /// Acknowledged operations by kind, for the report.
    acked: BTreeMap<&'static str, u64>,
}

impl AdminOp {
    fn kind(&self) -> &'static str {
        match self {
            AdminOp::EnrollRecovery => "enroll-recovery",
            AdminOp::EnrollTpm => "enroll-tpm2",
            AdminOp::Remove(_) => "remove-keyslot",
            AdminOp::Rotate => "rotate",
            AdminOp::Rekey => "rekey",
            AdminOp::Confirm(_) => "confirm-recovery",
            AdminOp::CreateKey { .. } => "create-key",
            AdminOp::DeleteKey(_) => "delete-key",
        }
    }
}

/// Counters for the report.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    acked: u64,
    in_flight: u64,
    in_flight_committed: u64,
    in_flight_absent: u64,
    verified_reads: u64,
    /// Puts found on record exactly once, in commit order, at the last check of the log.
    audited_puts: usize,
    share_unseals: u64,
    terms_seen: BTreeSet<u32>,
    /// Operations a kill cut off, by kind: (committed, absent) after the restart.
    cut: BTreeMap<&'static str, (u64, u64)>,
}

/// What the workers and the killer share during a round.
#[derive(Debug, Default)]
struct Round {
    acked: Mutex<u64>,
    sent: Mutex<u64>,
    changed: Condvar,
    /// Set by the main thread just before SIGKILL: from then on, a lost connection is the kill.
    killing: AtomicBool,
    /// The first unexpected failure a worker saw.
    failure: Mutex<Option<String>>,
}

impl Round {
    fn sent(&self) {
        *self.sent.lock().unwrap() += 1;
    }
    fn acked(&self) {
        *self.acked.lock().unwrap() += 1;
        self.changed.notify_all();
    }
    fn fail(&self, why: String) {
        self.failure.lock().unwrap().get_or_insert(why);
        // Under the lock the killer waits with, so its wake-up can't be lost.
        let _acked = self.acked.lock().unwrap();
        self.changed.notify_all();
    }
    fn failed(&self) -> bool {
        self.failure.lock().unwrap().is_some()
    }
}

/// How a call ended, seen from a worker.
enum Outcome<T> {
    Acked(T),
    /// The daemon refused it (a typed error while it was alive).
    Refused(ApiError),
    /// The connection went away: the kill (or, if not killing, a crash the harness reports).
    Cut,
}

fn outcome<T>(round: &Round, r: Result<T, ClientError>, what: &str) -> Outcome<T> {
    match r {
        Ok(v) => Outcome::Acked(v),
        Err(ClientError::Api(e)) => Outcome::Refused(e),
        Err(e) => {
            if !round.killing.load(Ordering::SeqCst) {
                round.fail(format!(
                    "{what}: the connection failed while no kill was sent: {e}"
                ));
            }
            Outcome::Cut
        }
    }
}

fn connect(socket: &std::path::Path) -> Client {
    let mut c = Client::connect(socket).unwrap();
    c.set_timeout(Some(DEADLINE)).unwrap();
    c
}

// ---------------------------------------------------------------------------------------------
// The workers.

fn run_writer(mut w: Writer, socket: PathBuf, round: Arc<Round>) -> Writer {
    let mut c = connect(&socket);
    let names: Vec<String> = w.names.keys().cloned().collect();
    loop {
        if round.failed() {
            return w;
        }
        let name = w.rng.pick(&names).clone();
        let live = !w.names[&name].is_empty();
        let roll = w.rng.below(10);
        if roll < 6 || !live {
            let value = value_of(&name, w.counter);
            w.counter += 1;
            w.in_flight = Some(SecretOp::Put {
                name: name.clone(),
                value: value.clone(),
            });
            round.sent();
            match outcome(&round, c.put_secret(&name, &value), "PutSecret") {
                Outcome::Acked(version) => {
                    let versions = w.names.get_mut(&name).unwrap();
                    if let Some((&last, _)) = versions.last_key_value() {
                        if version <= last {
                            round.fail(format!(
                                "{name}: put acknowledged version {version} after {last}"
                            ));
                            return w;
                        }
                    }
                    versions.insert(version, value);
                    w.puts.push((name.clone(), version));
                    w.in_flight = None;
                    round.acked();
                }
                Outcome::Refused(e) => {
                    round.fail(format!("PutSecret {name} refused: {e}"));
                    return w;
                }
                Outcome::Cut => return w,
            }
        } else if roll < 7 {
            w.in_flight = Some(SecretOp::Delete { name: name.clone() });
            round.sent();
            match outcome(&round, c.delete_secret(&name), "DeleteSecret") {
                Outcome::Acked(()) => {
                    w.names.get_mut(&name).unwrap().clear();
                    w.deletes += 1;
                    w.in_flight = None;
                    round.acked();
                }
                Outcome::Refused(e) => {
                    round.fail(format!("DeleteSecret {name} refused: {e}"));
                    return w;
                }
                Outcome::Cut => return w,
            }
        } else {
            // A read while writing: exactly the latest acknowledged version.
            round.sent();
            match outcome(&round, c.get_secret(&name, None), "GetSecret") {
                Outcome::Acked(reply) => {
                    let versions = &w.names[&name];
                    let (&version, value) = versions.last_key_value().unwrap();
                    if reply.version != version || reply.value.expose() != value.as_slice() {
                        round.fail(format!(
                            "{name}: read version {} ({} bytes), expected {version}",
                            reply.version,
                            reply.value.expose().len()
                        ));
                        return w;
                    }
                    round.acked();
                }
                Outcome::Refused(e) => {
                    round.fail(format!("GetSecret {name} refused: {e}"));
                    return w;
                }
                Outcome::Cut => return w,
            }
        }
    }
}

fn recovery_spec() -> SlotSpec {
    SlotSpec {
        threshold: Some(THRESHOLD),
        shares: Some(SHARES),
        ..SlotSpec::new(KeyslotKind::Recovery)
    }
}

fn tpm_spec() -> SlotSpec {
    SlotSpec {
        device: Some("tpm".into()),
        ..SlotSpec::new(KeyslotKind::Tpm2)
    }
}

fn texts(shares: Vec<SecretString>) -> Vec<String> {
    shares.iter().map(|s| s.expose().to_owned()).collect()
}

impl Admin {
    fn recovery_ids(&self) -> Vec<u32> {
        self.slots
            .iter()
            .filter(|(_, s)| s.kind == KeyslotKind::Recovery)
            .map(|(id, _)| *id)
            .collect()
    }

    fn tpm_slot(&self) -> Option<u32> {
        self.slots
            .iter()
            .find(|(_, s)| s.kind == KeyslotKind::Tpm2)
            .map(|(id, _)| *id)
    }

    /// Keep a rekey's new shares (every recovery slot's, in slot order) as pending: they are
    /// in force only once confirmed.
    fn take_rekey_shares(&mut self, reply: RekeyReply) -> Result<(), String> {
        let ids = self.recovery_ids();
        let shares = texts(reply.recovery_shares);
        if shares.len() != ids.len() * usize::from(SHARES) {
            return Err(format!(
                "rekey returned {} shares for {} recovery slots",
                shares.len(),
                ids.len()
            ));
        }
        if reply.pending_until.is_none() {
            return Err("a rekey that made new shares did not wait for their confirmation".into());
        }
        self.pending = Some(
            ids.iter()
                .zip(shares.chunks(usize::from(SHARES)))
                .map(|(id, chunk)| (*id, chunk.to_vec()))
                .collect(),
        );
        Ok(())
    }

    /// The shares that confirm everything waiting: `THRESHOLD` of each pending rekey set and
    /// of each unconfirmed slot's set.
    fn confirmation(&self) -> Option<Vec<String>> {
        let sets = self
            .pending
            .iter()
            .flat_map(|p| p.values())
            .chain(self.unconfirmed.iter().filter_map(|id| self.shares.get(id)));
        let shares: Vec<String> = sets
            .flat_map(|s| s.iter().take(usize::from(THRESHOLD)).cloned())
            .collect();
        (!shares.is_empty()).then_some(shares)
    }

    /// A confirmation was acknowledged: the pending rekey (if any) is in force.
    fn confirmed(&mut self, rekeyed: bool) -> Result<(), String> {
        if rekeyed != self.pending.is_some() {
            return Err(format!(
                "ConfirmRecovery said rekeyed={rekeyed} with a rekey {}pending",
                if self.pending.is_some() { "" } else { "not " }
            ));
        }
        if let Some(new) = self.pending.take() {
            self.shares = new;
        }
        self.unconfirmed.clear();
        Ok(())
    }

    fn next_op(&mut self) -> AdminOp {
        if let Some(shares) = self.confirmation() {
            return AdminOp::Confirm(shares);
        }
        loop {
            let recovery = self.recovery_ids().len();
            match self.rng.below(16) {
                0..=2 => return AdminOp::Rotate,
                3..=4 => return AdminOp::Rekey,
                5..=6 if recovery < 3 => return AdminOp::EnrollRecovery,
                7..=8 if recovery >= 2 => {
                    let ids = self.recovery_ids();
                    return AdminOp::Remove(*self.rng.pick(&ids));
                }
                9 if self.tpm_slot().is_none() => return AdminOp::EnrollTpm,
                10 => {
                    if let Some(id) = self.tpm_slot() {
                        return AdminOp::Remove(id);
                    }
                }
                11..=13 => {
                    let (device, algorithm) = *self.rng.pick(&[
                        ("hsm", KeyAlgorithm::EcdsaP256),
                        ("hsm", KeyAlgorithm::Ed25519),
                        ("tpm", KeyAlgorithm::EcdsaP256),
                    ]);
                    self.key_counter += 1;
                    return AdminOp::CreateKey {
                        name: format!("key-{}", self.key_counter),
                        device: device.into(),
                        algorithm,
                    };
                }
                14 if !self.keys.is_empty() => {
                    let names: Vec<String> = self.keys.keys().cloned().collect();
                    return AdminOp::DeleteKey(self.rng.pick(&names).clone());
                }
                _ => {}
            }
        }
    }
}

fn run_admin(mut a: Admin, socket: PathBuf, round: Arc<Round>) -> Admin {
    let mut c = connect(&socket);
    loop {
        if round.failed() {
            return a;
        }
        // A signature with a known key now and then: the device keys keep working.
        if !a.keys.is_empty() && a.rng.chance(30) {
            let names: Vec<String> = a.keys.keys().cloned().collect();
            let name = a.rng.pick(&names).clone();
            round.sent();
            match outcome(&round, c.sign(&name, b"crash", false), "Sign") {
                Outcome::Acked(signature) => {
                    if let Err(e) = verify(&a.keys[&name], b"crash", &signature) {
                        round.fail(format!("signature by {name}: {e}"));
                        return a;
                    }
                    round.acked();
                }
                Outcome::Refused(e) => {
                    round.fail(format!("Sign {name} refused: {e}"));
                    return a;
                }
                Outcome::Cut => return a,
            }
            continue;
        }
        let op = a.next_op();
        let kind = op.kind();
        a.in_flight = Some(op.clone());
        round.sent();
        let done: Result<(), String> = match op {
            AdminOp::EnrollRecovery => match outcome(&round, c.enroll(recovery_spec()), "Enroll") {
                Outcome::Acked(reply) => {
                    a.slots.insert(
                        reply.keyslot.id,
                        Slot {
                            kind: KeyslotKind::Recovery,
                            device: None,
                        },
                    );
                    a.shares
                        .insert(reply.keyslot.id, texts(reply.recovery_shares));
                    a.unconfirmed.insert(reply.keyslot.id);
                    Ok(())
                }
                Outcome::Refused(e) => Err(format!("Enroll recovery refused: {e}")),
                Outcome::Cut => return a,
            },
            AdminOp::EnrollTpm => match outcome(&round, c.enroll(tpm_spec()), "Enroll") {
                Outcome::Acked(reply) => {
                    a.slots.insert(
                        reply.keyslot.id,
                        Slot {
                            kind: KeyslotKind::Tpm2,
                            device: Some("tpm".into()),
                        },
                    );
                    Ok(())
                }
                Outcome::Refused(e) => Err(format!("Enroll tpm2 refused: {e}")),
                Outcome::Cut => return a,
            },
            AdminOp::Remove(id) => {
                match outcome(&round, c.remove_keyslot(id, false), "RemoveKeyslot") {
                    Outcome::Acked(()) => {
                        a.slots.remove(&id);
                        a.shares.remove(&id);
                        Ok(())
                    }
                    Outcome::Refused(e) => Err(format!("RemoveKeyslot {id} refused: {e}")),
                    Outcome::Cut => return a,
                }
            }
            AdminOp::Rotate => match outcome(&round, c.rotate(), "Rotate") {
                Outcome::Acked(term) if term == a.term + 1 => {
                    a.term = term;
                    Ok(())
                }
                Outcome::Acked(term) => Err(format!("Rotate from term {} gave {term}", a.term)),
                Outcome::Refused(e) => Err(format!("Rotate refused: {e}")),
                Outcome::Cut => return a,
            },
            AdminOp::Rekey => match outcome(&round, c.rekey(None), "Rekey") {
                Outcome::Acked(reply) => a.take_rekey_shares(reply),
                Outcome::Refused(e) => Err(format!("Rekey refused: {e}")),
                Outcome::Cut => return a,
            },
            AdminOp::Confirm(shares) => {
                let shares = shares
                    .iter()
                    .map(|s| SecretString::new(s.as_str()))
                    .collect();
                match outcome(&round, c.confirm_recovery(shares), "ConfirmRecovery") {
                    Outcome::Acked(reply) => a.confirmed(reply.rekeyed),
                    Outcome::Refused(e) => Err(format!("ConfirmRecovery refused: {e}")),
                    Outcome::Cut => return a,
                }
            }
            AdminOp::CreateKey {
                name,
                device,
                algorithm,
            } => match outcome(&round, c.create_key(&name, &device, algorithm), "CreateKey") {
                Outcome::Acked(public) => {
                    a.keys.insert(name, Key { algorithm, public });
                    Ok(())
                }
                Outcome::Refused(e) => Err(format!("CreateKey {name} refused: {e}")),
                Outcome::Cut => return a,
            },
            AdminOp::DeleteKey(name) => match outcome(&round, c.delete_key(&name), "DeleteKey") {
                Outcome::Acked(()) => {
                    a.keys.remove(&name);
                    Ok(())
                }
                Outcome::Refused(e) => Err(format!("DeleteKey {name} refused: {e}")),
                Outcome::Cut => return a,
            },
        };
        if let Err(e) = done {
            round.fail(e);
            return a;
        }
        a.in_flight = None;
        *a.acked.entry(kind).or_default() += 1;
        round.acked();
    }
}

fn verify(key: &Key, message: &[u8], signature: &[u8]) -> Result<(), String> {
    match key.algorithm {
        KeyAlgorithm::EcdsaP256 => {
            use p256::ecdsa::signature::Verifier as _;
            let vk = p256::ecdsa::VerifyingKey::from_public_key_der(&key.public)
                .map_err(|e| e.to_string())?;
            let sig = p256::ecdsa::Signature::from_der(signature).map_err(|e| e.to_string())?;
            vk.verify(message, &sig).map_err(|e| e.to_string())
        }
        KeyAlgorithm::Ed25519 => {
            use ed25519_dalek::Verifier as _;
            let vk = ed25519_dalek::VerifyingKey::from_public_key_der(&key.public)
                .map_err(|e| e.to_string())?;
            let sig = ed25519_dalek::Signature::from_slice(signature).map_err(|e| e.to_string())?;
            vk.verify(message, &sig).map_err(|e| e.to_string())
        }
        other => Err(format!("no verifier for {other}")),
    }
}

// ---------------------------------------------------------------------------------------------
// The harness.

struct Harness {
    daemon: Keywardd,
    seed: u64,
    kill: usize,
    tally: Tally,
    /// The audit log's size after each start, when the daemon keeps one.
    audit_sizes: Vec<u64>,
}

impl Harness {
    fn settled(&mut self, kind: &'static str, committed: bool) {
        let entry = self.tally.cut.entry(kind).or_default();
        if committed {
            self.tally.in_flight_committed += 1;
            entry.0 += 1;
        } else {
            self.tally.in_flight_absent += 1;
            entry.1 += 1;
        }
    }

    /// Panic with the seed and the kill number, so the failure can be replayed.
    fn fail(&self, why: impl std::fmt::Display) -> ! {
        panic!(
            "crash consistency failed after kill {} (replay with {SEED_ENV}={}): {why}\n\
             keywardd log (last 60 lines):\n{}",
            self.kill,
            self.seed,
            tail(&self.daemon.log(), 60)
        )
    }

    fn check(&self, ok: bool, why: impl FnOnce() -> String) {
        if !ok {
            self.fail(why());
        }
    }

    fn client(&self) -> Client {
        connect(self.daemon.socket())
    }

    /// A call made by the harness itself, with the daemon alive: it must succeed.
    fn must<T>(&self, what: &str, r: Result<T, ClientError>) -> T {
        r.unwrap_or_else(|e| self.fail(format!("{what}: {e}")))
    }

    fn note_audit_log(&mut self) {
        let path = self.daemon.dir().join("state").join("audit.log");
        if let Ok(meta) = std::fs::metadata(path) {
            self.audit_sizes.push(meta.len());
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// After a restart: settle what was in flight when the kill landed, against what the daemon
/// shows now.
fn resolve(h: &mut Harness, c: &mut Client, writers: &mut [Writer], admin: &mut Admin) {
    for w in writers.iter_mut() {
        let Some(op) = w.in_flight.take() else {
            continue;
        };
        h.tally.in_flight += 1;
        match op {
            SecretOp::Put { name, value } => {
                let acked = &w.names[&name];
                let now = stored_versions(h, c, &name);
                let new: Vec<u64> = now
                    .iter()
                    .copied()
                    .filter(|v| !acked.contains_key(v))
                    .collect();
                match new.as_slice() {
                    [] => h.settled("put", false),
                    [v] => {
                        h.check(acked.keys().all(|a| a < v), || {
                            format!("{name}: the unacknowledged put is version {v}, not after {acked:?}")
                        });
                        let got = h.must(
                            &format!("GetSecret {name}@{v} (the put in flight)"),
                            c.get_secret(&name, Some(*v)),
                        );
                        h.check(got.value.expose() == value.as_slice(), || {
                            format!(
                                "{name}@{v}: the put in flight is half-visible: {} bytes, not the {} sent",
                                got.value.expose().len(),
                                value.len()
                            )
                        });
                        w.names.get_mut(&name).unwrap().insert(*v, value);
                        w.puts.push((name.clone(), *v));
                        h.settled("put", true);
                    }
                    many => h.fail(format!("{name}: one put in flight left versions {many:?}")),
                }
            }
            SecretOp::Delete { name } => {
                let acked: Vec<u64> = w.names[&name].keys().copied().collect();
                let now = stored_versions(h, c, &name);
                if now.is_empty() {
                    w.names.get_mut(&name).unwrap().clear();
                    w.deletes += 1;
                    h.settled("delete", true);
                } else {
                    h.check(now == acked, || {
                        format!("{name}: a delete in flight left versions {now:?} of {acked:?}")
                    });
                    h.settled("delete", false);
                }
            }
        }
    }

    let Some(op) = admin.in_flight.take() else {
        return;
    };
    h.tally.in_flight += 1;
    let slots = h.must("ListKeyslots", c.list_keyslots());
    let ids: BTreeSet<u32> = slots.iter().map(|s| s.id).collect();
    let known: BTreeSet<u32> = admin.slots.keys().copied().collect();
    let kind = op.kind();
    let committed = match op {
        AdminOp::EnrollRecovery | AdminOp::EnrollTpm => {
            let slot_kind = if matches!(op, AdminOp::EnrollTpm) {
                KeyslotKind::Tpm2
            } else {
                KeyslotKind::Recovery
            };
            let new: Vec<&Keyslot> = slots.iter().filter(|s| !known.contains(&s.id)).collect();
            match new.as_slice() {
                [] => false,
                [s] => {
                    h.check(s.kind == slot_kind, || {
                        format!("enroll {slot_kind} in flight made {s:?}")
                    });
                    if s.kind == KeyslotKind::Recovery {
                        // Its shares were never seen, so it is unconfirmed: not a way in, and
                        // removed without --force.
                        h.check(s.unconfirmed_until.is_some(), || {
                            format!("a recovery slot nobody saw the shares of is confirmed: {s:?}")
                        });
                        h.must(
                            &format!("RemoveKeyslot {} (enrolled in flight)", s.id),
                            c.remove_keyslot(s.id, false),
                        );
                    } else {
                        admin.slots.insert(
                            s.id,
                            Slot {
                                kind: s.kind,
                                device: s.device.clone(),
                            },
                        );
                    }
                    true
                }
                many => h.fail(format!("one enroll in flight made keyslots {many:?}")),
            }
        }
        AdminOp::Remove(id) => {
            if ids.contains(&id) {
                false
            } else {
                admin.slots.remove(&id);
                admin.shares.remove(&id);
                true
            }
        }
        AdminOp::Rotate => {
            let term = h.must("Status", c.status()).term.unwrap_or_default();
            h.check(term == admin.term || term == admin.term + 1, || {
                format!(
                    "a rotate in flight from term {} left term {term}",
                    admin.term
                )
            });
            let moved = term != admin.term;
            admin.term = term;
            moved
        }
        AdminOp::Rekey => resolve_rekey(h, c, admin),
        AdminOp::Confirm(shares) => resolve_confirm(h, c, admin, shares),
        AdminOp::CreateKey {
            name, algorithm, ..
        } => {
            let keys = h.must("ListKeys", c.list_keys());
            if keys.iter().any(|k| k.name == name) {
                let public = h.must(&format!("PublicKey {name}"), c.public_key(&name));
                let key = Key { algorithm, public };
                let signature = h.must(
                    &format!("Sign with {name} (created in flight)"),
                    c.sign(&name, b"in flight", false),
                );
                if let Err(e) = verify(&key, b"in flight", &signature) {
                    h.fail(format!("key {name} created in flight does not verify: {e}"));
                }
                admin.keys.insert(name, key);
                true
            } else {
                false
            }
        }
        AdminOp::DeleteKey(name) => {
            let keys = h.must("ListKeys", c.list_keys());
            if keys.iter().any(|k| k.name == name) {
                false
            } else {
                admin.keys.remove(&name);
                true
            }
        }
    };
    h.settled(kind, committed);
}

/// A rekey whose reply was lost: it can only have been prepared, never put in force (nobody
/// saw its shares), so the shares from before it must still open the vault. Whether it was
/// prepared shows in `Status`; either way the harness starts it over and confirms it, so that
/// no rekey it can't confirm stays pending. Seals the vault to check; leaves it open.
fn resolve_rekey(h: &mut Harness, c: &mut Client, admin: &mut Admin) -> bool {
    let prepared = h.must("Status", c.status()).rekey_pending_until.is_some();
    if let Some((&id, shares)) = admin.shares.iter().next() {
        let shares = shares.clone();
        h.must("Seal", c.seal());
        for share in shares.iter().take(usize::from(THRESHOLD)) {
            let reply = c.unseal(UnsealParams {
                recovery_share: Some(SecretString::new(share.as_str())),
                pin: None,
            });
            if let Err(e) = reply {
                h.fail(format!(
                    "the shares of keyslot {id} no longer open the vault after a rekey whose \
                     reply was lost: {e}"
                ));
            }
        }
        h.check(!h.must("Status", c.status()).sealed, || {
            format!("the shares of keyslot {id} did not open the vault after a rekey in flight")
        });
    }
    if prepared {
        let reply = h.must("Rekey (started over)", c.rekey(None));
        if let Err(e) = admin.take_rekey_shares(reply) {
            h.fail(e);
        }
        confirm_now(h, c, admin);
    }
    prepared
}

/// A confirmation whose reply was lost: sending it again must succeed either way, and says
/// whether the first one had put a pending rekey in force already.
fn resolve_confirm(
    h: &mut Harness,
    c: &mut Client,
    admin: &mut Admin,
    shares: Vec<String>,
) -> bool {
    let unconfirmed_before = h
        .must("ListKeyslots", c.list_keyslots())
        .iter()
        .filter(|s| s.unconfirmed_until.is_some())
        .count();
    let shares = shares
        .iter()
        .map(|s| SecretString::new(s.as_str()))
        .collect();
    let reply = h.must("ConfirmRecovery (again)", c.confirm_recovery(shares));
    let committed = match &admin.pending {
        // Had the first one taken effect, there would be nothing left to rekey.
        Some(_) => !reply.rekeyed,
        None => unconfirmed_before == 0,
    };
    // Either way, everything it confirms is in force now.
    if let Some(new) = admin.pending.take() {
        admin.shares = new;
    }
    admin.unconfirmed.clear();
    committed
}

/// Confirm whatever waits, as a call of the harness's own that must succeed.
fn confirm_now(h: &mut Harness, c: &mut Client, admin: &mut Admin) {
    let Some(shares) = admin.confirmation() else {
        return;
    };
    let shares = shares
        .iter()
        .map(|s| SecretString::new(s.as_str()))
        .collect();
    let reply = h.must("ConfirmRecovery", c.confirm_recovery(shares));
    if let Err(e) = admin.confirmed(reply.rekeyed) {
        h.fail(e);
    }
}

/// The versions the daemon holds for `name` (none when it has no such secret).
fn stored_versions(h: &Harness, c: &mut Client, name: &str) -> Vec<u64> {
    match c.secret_versions(name) {
        Ok(v) => v.iter().map(|v| v.version).collect(),
        Err(ClientError::Api(ApiError::NotFound { .. })) => Vec::new(),
        Err(e) => h.fail(format!("SecretVersions {name}: {e}")),
    }
}

/// Everything the harness knows, checked against the daemon.
fn verify_all(h: &mut Harness, c: &mut Client, writers: &[Writer], admin: &Admin) {
    let status = h.must("Status", c.status());
    h.check(status.initialized && !status.sealed, || {
        format!("the vault is not open: {status:?}")
    });
    h.check(status.term == Some(admin.term), || {
        format!("term {:?}, acknowledged {}", status.term, admin.term)
    });

    // Keyslots: exactly the acknowledged ones.
    let slots = h.must("ListKeyslots", c.list_keyslots());
    let now: BTreeMap<u32, Slot> = slots
        .iter()
        .map(|s| {
            (
                s.id,
                Slot {
                    kind: s.kind,
                    device: s.device.clone(),
                },
            )
        })
        .collect();
    h.check(now == admin.slots, || {
        format!("keyslots {now:?}, acknowledged {:?}", admin.slots)
    });

    // Secrets: the names, every acknowledged version with exactly its value, nothing else.
    let listed: BTreeSet<String> = h
        .must("ListSecrets", c.list_secrets(None))
        .into_iter()
        .collect();
    let live: BTreeSet<String> = writers
        .iter()
        .flat_map(|w| w.names.iter())
        .filter(|(_, v)| !v.is_empty())
        .map(|(n, _)| n.clone())
        .collect();
    h.check(listed == live, || {
        format!("secrets listed {listed:?}, acknowledged {live:?}")
    });
    for w in writers {
        for (name, versions) in &w.names {
            let stored = stored_versions(h, c, name);
            let acked: Vec<u64> = versions.keys().copied().collect();
            h.check(stored == acked, || {
                format!("{name}: versions {stored:?}, acknowledged {acked:?}")
            });
            if versions.is_empty() {
                match c.get_secret(name, None) {
                    Err(ClientError::Api(ApiError::NotFound { .. })) => {}
                    other => h.fail(format!(
                        "{name} was deleted, yet reads {:?}",
                        other.map(|r| r.version)
                    )),
                }
                continue;
            }
            let terms: BTreeMap<u64, u32> = c
                .secret_versions(name)
                .map(|v| v.iter().map(|v| (v.version, v.term)).collect())
                .unwrap_or_default();
            for (&version, value) in versions {
                let got = h.must(
                    &format!("GetSecret {name}@{version}"),
                    c.get_secret(name, Some(version)),
                );
                h.check(
                    got.version == version && got.value.expose() == value.as_slice(),
                    || {
                        format!(
                            "{name}@{version}: read {} bytes as version {}",
                            got.value.expose().len(),
                            got.version
                        )
                    },
                );
                h.check(counter_of(name, got.value.expose()).is_some(), || {
                    format!("{name}@{version}: the value is not one this harness wrote")
                });
                if let Some(term) = terms.get(&version) {
                    h.check(*term <= admin.term, || {
                        format!("{name}@{version} is in term {term} > {}", admin.term)
                    });
                    h.tally.terms_seen.insert(*term);
                }
                h.tally.verified_reads += 1;
            }
            let (&latest, _) = versions.last_key_value().unwrap();
            let got = h.must(&format!("GetSecret {name}"), c.get_secret(name, None));
            h.check(got.version == latest, || {
                format!("{name}: latest is {}, acknowledged {latest}", got.version)
            });
        }
    }

    // Keys: the acknowledged ones, same public keys; a few sign.
    let keys: BTreeSet<String> = h
        .must("ListKeys", c.list_keys())
        .into_iter()
        .map(|k| k.name)
        .collect();
    let known: BTreeSet<String> = admin.keys.keys().cloned().collect();
    h.check(keys == known, || {
        format!("keys {keys:?}, acknowledged {known:?}")
    });
    for (i, (name, key)) in admin.keys.iter().rev().enumerate() {
        let public = h.must(&format!("PublicKey {name}"), c.public_key(name));
        h.check(public == key.public, || {
            format!("key {name}: another public key")
        });
        if i < 3 {
            let signature = h.must(
                &format!("Sign with {name}"),
                c.sign(name, b"after a kill", false),
            );
            if let Err(e) = verify(key, b"after a kill", &signature) {
                h.fail(format!("key {name}: signature does not verify: {e}"));
            }
        }
    }
}

/// The audit log against the store, after the restart (whose outbox export appended what a
/// kill left committed but not yet in the file): the chain verifies; every acknowledged put
/// (and every put in flight found committed) is on record exactly once, naming its version;
/// there are as many delete records as deletes that took effect; no put is on record that
/// did not take effect; and the records come in commit order (outbox numbers rising along
/// the chain, each name's versions rising).
fn check_audit(h: &mut Harness, writers: &[Writer]) {
    let state = h.daemon.dir().join("state");
    let mut bytes = Vec::new();
    for file in audit::set_in(&state).unwrap() {
        bytes.extend(std::fs::read(file).unwrap());
    }
    // The daemon runs on (a periodic checkpoint may be going in): complete lines only.
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    bytes.truncate(end);
    let pem = std::fs::read_to_string(state.join(audit::PUBLIC_KEY_FILE)).unwrap();
    let key = audit::decode_key(&pem).unwrap();
    if let Err(f) = audit::verify(&bytes, &key) {
        h.fail(format!("the audit log does not verify: {f}"));
    }
    let mut on_record: BTreeMap<(String, u64), usize> = BTreeMap::new();
    let mut latest: BTreeMap<String, u64> = BTreeMap::new();
    let mut deletes = 0u64;
    let mut last_outbox = 0u64;
    for line in audit::lines(&bytes) {
        let Ok(record) = audit::parse(line.bytes) else {
            continue;
        };
        let audit::Body::Request(r) = record.body else {
            continue;
        };
        if r.op != "PutSecret" && r.op != "DeleteSecret" || r.result != audit::OK {
            continue;
        }
        let Some(id) = r.outbox else {
            h.fail(format!(
                "seq {}: a {} that took effect without an outbox number",
                record.seq, r.op
            ));
        };
        h.check(id > last_outbox, || {
            format!(
                "seq {}: outbox #{id} after #{last_outbox}: not in commit order",
                record.seq
            )
        });
        last_outbox = id;
        if r.op == "DeleteSecret" {
            deletes += 1;
            continue;
        }
        let version = r
            .detail
            .as_deref()
            .and_then(|d| d.strip_prefix("version "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| h.fail(format!("seq {}: a put names no version", record.seq)));
        let before = latest.insert(r.target.clone(), version).unwrap_or(0);
        h.check(version > before, || {
            format!(
                "seq {}: {} version {version} on record after version {before}",
                record.seq, r.target
            )
        });
        *on_record.entry((r.target, version)).or_default() += 1;
    }
    let mut acked = BTreeSet::new();
    for (name, version) in writers.iter().flat_map(|w| w.puts.iter()) {
        acked.insert((name.clone(), *version));
        let times = on_record
            .get(&(name.clone(), *version))
            .copied()
            .unwrap_or(0);
        h.check(times == 1, || {
            format!("{name}@{version} took effect and is on record {times} times")
        });
    }
    for put in on_record.keys() {
        h.check(acked.contains(put), || {
            format!("{}@{} is on record but never took effect", put.0, put.1)
        });
    }
    let done: u64 = writers.iter().map(|w| w.deletes).sum();
    h.check(deletes == done, || {
        format!("{deletes} deletes on record, {done} took effect")
    });
    h.tally.audited_puts = acked.len();
}

/// How many records the starts appended from the audit outbox (changes a kill cut off after
/// their commit, before their line), as the daemon logged them.
fn appended_at_start(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("appended the records of changes committed before the last stop"))
        .filter_map(|l| l.split("records=").nth(1))
        .filter_map(|n| {
            n.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Seal, then open with the shares of a recovery slot: the last acknowledged rekey's or
/// enroll's shares must work. Then check a read.
fn unseal_with_shares(h: &mut Harness, c: &mut Client, admin: &Admin, rng: &mut Rng) {
    let known: Vec<u32> = admin.shares.keys().copied().collect();
    if known.is_empty() {
        return;
    }
    let id = *rng.pick(&known);
    let shares = &admin.shares[&id];
    h.must("Seal", c.seal());
    h.check(h.must("Status", c.status()).sealed, || {
        "Seal left the vault open".into()
    });
    // Any THRESHOLD of the shares, here the last ones.
    for (i, share) in shares.iter().rev().take(usize::from(THRESHOLD)).enumerate() {
        let reply = h.must(
            &format!("Unseal with share {i} of keyslot {id}"),
            c.unseal(UnsealParams {
                recovery_share: Some(SecretString::new(share.as_str())),
                pin: None,
            }),
        );
        h.check(reply.sealed == (i + 1 < usize::from(THRESHOLD)), || {
            format!("share {i} of keyslot {id}: sealed={}", reply.sealed)
        });
    }
    let status = h.must("Status", c.status());
    h.check(
        !status.sealed
            && status
                .unsealed_by
                .clone()
                .unwrap_or_default()
                .contains("recovery"),
        || format!("recovery shares of keyslot {id} did not open the vault: {status:?}"),
    );
    h.tally.share_unseals += 1;
}

/// Keep the workload able to prove things: shares known for some recovery slot.
fn refresh_shares(h: &mut Harness, c: &mut Client, admin: &mut Admin) {
    if admin.recovery_ids().is_empty() {
        let reply = h.must("Enroll recovery", c.enroll(recovery_spec()));
        admin.slots.insert(
            reply.keyslot.id,
            Slot {
                kind: KeyslotKind::Recovery,
                device: None,
            },
        );
        admin
            .shares
            .insert(reply.keyslot.id, texts(reply.recovery_shares));
        admin.unconfirmed.insert(reply.keyslot.id);
    }
    if admin.shares.is_empty() {
        let reply = h.must("Rekey", c.rekey(None));
        if let Err(e) = admin.take_rekey_shares(reply) {
            h.fail(e);
        }
    }
    confirm_now(h, c, admin);
}

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
    )
}

#[test]
fn acknowledged_writes_survive_sigkill_and_the_vault_always_opens() {
    let kills = env_number(KILLS_ENV).map_or(DEFAULT_KILLS, |n| n as usize);
    let seed = env_number(SEED_ENV).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    eprintln!("crash: seed {seed} (replay: {SEED_ENV}={seed}), {kills} kills");
    let started = Instant::now();
    let mut rng = Rng(seed);

    let tpm = Swtpm::start();
    let token = SoftHsm::new("kw-crash");
    let daemon = Setup::new()
        .tpm("tpm", &tpm)
        .token("hsm", &token)
        .unseal_order(&["tpm", "hsm"])
        .start();
    let mut h = Harness {
        daemon,
        seed,
        kill: 0,
        tally: Tally::default(),
        audit_sizes: Vec::new(),
    };
    let mut c = h.client();
    let init = h.must(
        "Init",
        c.init(vec![
            tpm_spec(),
            SlotSpec {
                device: Some("hsm".into()),
                ..SlotSpec::new(KeyslotKind::Pkcs11)
            },
            recovery_spec(),
        ]),
    );
    let mut admin = Admin {
        slots: init
            .keyslots
            .iter()
            .map(|s| {
                (
                    s.id,
                    Slot {
                        kind: s.kind,
                        device: s.device.clone(),
                    },
                )
            })
            .collect(),
        shares: BTreeMap::new(),
        pending: None,
        unconfirmed: BTreeSet::new(),
        term: h.must("Status", c.status()).term.unwrap_or_default(),
        keys: BTreeMap::new(),
        key_counter: 0,
        in_flight: None,
        rng: rng.fork(),
        acked: BTreeMap::new(),
    };
    let recovery = admin.recovery_ids();
    admin
        .shares
        .insert(recovery[0], texts(init.recovery_shares));
    admin.unconfirmed.insert(recovery[0]);
    let mut writers: Vec<Writer> = (0..WRITERS)
        .map(|id| Writer {
            names: (0..NAMES_PER_WRITER)
                .map(|j| (format!("w{id}/s{j}"), Versions::new()))
                .collect(),
            counter: 0,
            in_flight: None,
            rng: rng.fork(),
            puts: Vec::new(),
            deletes: 0,
        })
        .collect();

    for kill in 1..=kills {
        h.kill = kill;
        let round = Arc::new(Round::default());
        let target = 1 + rng.below(MAX_OPS_BEFORE_KILL);
        let socket = h.daemon.socket().to_owned();
        let writer_threads: Vec<_> = std::mem::take(&mut writers)
            .into_iter()
            .map(|mut w| {
                w.rng = w.rng.fork();
                let (socket, round) = (socket.clone(), Arc::clone(&round));
                std::thread::spawn(move || run_writer(w, socket, round))
            })
            .collect();
        let admin_thread = {
            let (socket, round) = (socket.clone(), Arc::clone(&round));
            let a = std::mem::replace(
                &mut admin,
                Admin {
                    slots: BTreeMap::new(),
                    shares: BTreeMap::new(),
                    pending: None,
                    unconfirmed: BTreeSet::new(),
                    term: 0,
                    keys: BTreeMap::new(),
                    key_counter: 0,
                    in_flight: None,
                    rng: Rng(0),
                    acked: BTreeMap::new(),
                },
            );
            std::thread::spawn(move || run_admin(a, socket, round))
        };

        // The kill point, in acknowledged operations.
        {
            let deadline = Instant::now() + DEADLINE;
            let mut acked = round.acked.lock().unwrap();
            while *acked < target && !round.failed() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    round.fail(format!(
                        "only {} operations acknowledged in {DEADLINE:?}",
                        *acked
                    ));
                    break;
                }
                acked = round.changed.wait_timeout(acked, left).unwrap().0;
            }
        }
        round.killing.store(true, Ordering::SeqCst);
        h.daemon.kill();

        writers = writer_threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        admin = admin_thread.join().unwrap();
        if let Some(why) = round.failure.lock().unwrap().clone() {
            h.fail(why);
        }
        h.tally.sent += *round.sent.lock().unwrap();
        h.tally.acked += *round.acked.lock().unwrap();

        // Restart on the same state; READY=1 comes after the unattended unseal.
        h.daemon.start();
        h.note_audit_log();
        c = h.client();
        let status = h.must("Status", c.status());
        h.check(status.initialized && !status.sealed, || {
            format!("not unsealed unattended after the kill: {status:?}")
        });
        let by = status.unsealed_by.unwrap_or_default();
        resolve(&mut h, &mut c, &mut writers, &mut admin);
        // The TPM is tried first: with a TPM slot (its enrollment settled) it opens the vault,
        // without one the token does. Anything else means a slot that does not work.
        let expect = if admin.tpm_slot().is_some() {
            "tpm2"
        } else {
            "pkcs11"
        };
        h.check(by.contains(expect), || {
            format!(
                "unsealed by {by:?}, expected a {expect} slot (keyslots {:?})",
                admin.slots
            )
        });
        verify_all(&mut h, &mut c, &writers, &admin);
        check_audit(&mut h, &writers);
        refresh_shares(&mut h, &mut c, &mut admin);
        if rng.chance(30) {
            unseal_with_shares(&mut h, &mut c, &admin, &mut rng);
        }
        if kill % 10 == 0 {
            eprintln!(
                "crash: {kill}/{kills} kills, {} acknowledged, {:.0?}",
                h.tally.acked,
                started.elapsed()
            );
        }
    }
    // The last word: everything reads, and the shares still open it.
    verify_all(&mut h, &mut c, &writers, &admin);
    check_audit(&mut h, &writers);
    unseal_with_shares(&mut h, &mut c, &admin, &mut rng);

    let t = &h.tally;
    eprintln!("crash: acknowledged admin operations: {:?}", admin.acked);
    eprintln!(
        "crash: cut off by a kill, (committed, absent) after the restart: {:?}",
        t.cut
    );
    eprintln!(
        "crash: kills={kills} ops={} acked={} in_flight={} (committed={}, absent={}) \
         verified={} audited_puts={} appended_at_start={} share_unseals={} terms={} keyslots={} keys={} audit_log={} \
         failures=0 seed={seed} wall={:.1?}",
        t.sent,
        t.acked,
        t.in_flight,
        t.in_flight_committed,
        t.in_flight_absent,
        t.verified_reads,
        t.audited_puts,
        appended_at_start(&h.daemon.plain_log()),
        t.share_unseals,
        t.terms_seen.len(),
        admin.slots.len(),
        admin.keys.len(),
        h.audit_sizes
            .last()
            .map_or("none".to_owned(), |n| format!("{n} bytes")),
        started.elapsed()
    );
    assert!(t.acked > 0 && t.verified_reads > 0);
}
