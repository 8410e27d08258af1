//! The wire contract of `org.keyward.Custodian`: method names, parameter and reply types, errors,
//! and the Varlink interface description. The daemon's transports and this crate's client both
//! use these types, so the two sides cannot drift apart.
//!
//! Each method is declared once, in the table [`keyward_methods!`](crate::keyward_methods):
//! [`Request`], [`Reply`], [`methods`] and [`METHODS`] are built from it, and so are the
//! daemon's D-Bus members. The interface text is written by hand; a test holds it to the table
//! and to [`ApiError`].
//!
//! Binary values travel as base64 strings. Secret values use [`SecretValue`], which decodes
//! straight into zeroizing memory and never prints its content.

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

pub use crate::kinds::{DeviceKind, KeyAlgorithm, KeyslotKind, SignHash};
pub use crate::names::{KeyName, SecretName, TransitKeyName};

/// The interface name.
pub const INTERFACE: &str = "org.keyward.Custodian";

/// Largest secret value, in bytes (before base64).
pub const MAX_SECRET_LEN: usize = 1024 * 1024;

/// Largest Varlink message (request or reply), in bytes, NUL excluded. A 1 MiB secret is about
/// 1.4 MiB in base64; the rest is headroom for names and JSON.
pub const MAX_FRAME_LEN: usize = 2 * 1024 * 1024;

/// The Varlink interface description served by `org.varlink.service.GetInterfaceDescription`.
pub const INTERFACE_DESCRIPTION: &str = r#"# Keyward: a hardware-backed key custodian.
# Secrets are encrypted under a vault master key that only a TPM 2.0 or a PKCS#11 token can
# release; signing keys live inside those devices. Binary values are base64.
interface org.keyward.Custodian

# One way into the vault: the master key sealed by a TPM, a PKCS#11 token, or recovery shares.
type Keyslot (
  id: int,
  kind: string,
  device: ?string,
  pcrs: ?[]int,
  pin: bool,
  threshold: ?int,
  shares: ?int,
  created: string,
  unconfirmed_until: ?string,
  signed_pcrs: ?[]int,
  pcr_public_key: ?string
)

# What to enroll: kind is tpm2, pkcs11 or recovery. A tpm2 slot may also be bound to PCR
# policies signed by pcr_public_key (PEM, RSA; systemd-measure's format) over signed_pcrs
# (default [11]).
type SlotSpec (
  kind: string,
  device: ?string,
  pcrs: ?[]int,
  pin: ?string,
  threshold: ?int,
  shares: ?int,
  pcr_public_key: ?string,
  signed_pcrs: ?[]int
)

# algorithms: what CreateKey can make on the device (probed when it opened; empty while down).
type DeviceStatus (name: string, kind: string, available: bool, detail: string, algorithms: []string)

type SecretVersion (version: int, term: int, created: string)

type KeyInfo (name: string, device: string, algorithm: string, created: string)

# What a PKCS#11 token reports about a private key (CKA_LOCAL, CKA_NEVER_EXTRACTABLE, ...).
type Pkcs11Attributes (
  local: bool,
  never_extractable: bool,
  always_sensitive: bool,
  extractable: bool,
  sensitive: bool
)

# A key attestation. format tpm2-certify/v1: attest is the TPMS_ATTEST the TPM signed with its
# attestation key (signer_public_key, signer_public_area) over the key's TPMT_PUBLIC
# (key_public_area) and the nonce. format pkcs11-attributes/v1: the token's attributes, signed
# by the vault's audit key (Ed25519): not a hardware attestation.
type Attestation (
  format: string,
  key: string,
  device: string,
  algorithm: string,
  public_key: string,
  nonce: string,
  signer_public_key: string,
  signature: string,
  attest: ?string,
  key_public_area: ?string,
  signer_public_area: ?string,
  ek_certificates: ?[]string,
  attributes: ?Pkcs11Attributes,
  note: string
)

# State of the vault and its devices. audit_public_key is the audit log's current signing key
# (base64 DER SubjectPublicKeyInfo, Ed25519), once the vault has been unsealed.
method Status() -> (
  initialized: bool,
  sealed: bool,
  unsealed_by: ?string,
  reason: ?string,
  keyslots: []Keyslot,
  devices: []DeviceStatus,
  shares_pending: ?int,
  term: ?int,
  version: string,
  audit_public_key: ?string,
  rekey_pending_until: ?string,
  audit_finding: ?string,
  storage: ?string
)

# Create the vault master key and enroll its first keyslots. A recovery slot's shares are
# unconfirmed (unconfirmed_until) until ConfirmRecovery gets enough of them back, or they
# unseal the vault.
method Init(slots: []SlotSpec) -> (keyslots: []Keyslot, recovery_shares: []string)

# Add a keyslot; acknowledged only after a test unseal through it. Recovery shares are
# unconfirmed as with Init.
method Enroll(slot: SlotSpec) -> (keyslot: Keyslot, recovery_shares: []string)

method ListKeyslots() -> (keyslots: []Keyslot)

# Removing the last hardware slot while no recovery slot exists needs force.
method RemoveKeyslot(id: int, force: ?bool) -> ()

# New master key: the keyring and every slot are sealed again. A slot bound to a PIN needs
# the PIN. With recovery slots, the new shares are returned once and the rekey is pending
# (pending_until): the current key and the old shares stay in force until ConfirmRecovery
# gets enough of the new shares back. Unconfirmed, it lapses; a new Rekey starts it over.
method Rekey(pin: ?string) -> (recovery_shares: []string, pending_until: ?string)

# Prove that recovery shares reached a person: enough shares of each pending set (a pending
# rekey's, an unconfirmed keyslot's). A pending rekey then takes effect. Shares of a set
# already confirmed are checked and change nothing.
method ConfirmRecovery(recovery_shares: []string) -> (keyslots: []Keyslot, rekeyed: bool)

# New data-key term for new secret versions; old terms stay readable.
method Rotate() -> (term: int)

# Forget the master key until the next unseal.
method Seal() -> ()

# Give one recovery share, or a PIN; sealed is false once the vault is open.
method Unseal(recovery_share: ?string, pin: ?string) -> (sealed: bool, shares_needed: ?int)

method PutSecret(name: string, value: string) -> (version: int)

method GetSecret(name: string, version: ?int) -> (value: string, version: int)

method ListSecrets(prefix: ?string) -> (names: []string)

method SecretVersions(name: string) -> (versions: []SecretVersion)

method DeleteSecret(name: string) -> ()

# Generate a key pair inside a device: algorithm is ed25519, ecdsa-p256 or rsa-pss-3072.
# public_key is DER SubjectPublicKeyInfo.
method CreateKey(name: string, device: string, algorithm: string) -> (public_key: string)

method ListKeys() -> (keys: []KeyInfo)

method PublicKey(name: string) -> (public_key: string)

# Sign data inside the device. hash is sha256 (the default) or, for rsa-pkcs1 keys, sha512;
# with prehashed, data is a digest of that hash.
# Ed25519: raw 64 bytes; ECDSA: DER; RSA (PSS and PKCS#1 v1.5): raw.
method Sign(name: string, data: string, prehashed: ?bool, hash: ?string) -> (signature: string)

method DeleteKey(name: string) -> ()

# Create a transit key: a data key made and kept by the vault (sealed under its master key),
# for Encrypt and Decrypt; it never leaves the daemon. Its first version is 1.
method CreateTransitKey(name: string) -> (version: int)

# A new version of a transit key: Encrypt uses it from now on, every older version still
# decrypts.
method RotateTransitKey(name: string) -> (version: int)

# Encrypt plaintext (base64) under the newest version of a transit key. The ciphertext is
# vault:v<version>:<base64>, as OpenBao's transit engine writes it. associated_data (base64),
# when given, is bound to the ciphertext and must be given again to decrypt it.
method Encrypt(name: string, plaintext: string, associated_data: ?string) -> (ciphertext: string)

# Decrypt a ciphertext of Encrypt, with the version of the key it names.
method Decrypt(name: string, ciphertext: string, associated_data: ?string) -> (plaintext: string)

# A consistent copy of the database, taken now while writes go on, as a backup file (a header
# with the audit log's head, then the database: sealed blobs and ciphertext only). The daemon
# keeps the one newest file until BackupChunk has read it to its end. sha256 covers the file.
method Backup() -> (id: string, size: int, sha256: string)

# Up to 1 MiB (before base64) of the backup file id, from offset.
method BackupChunk(id: string, offset: int) -> (data: string)
# One secret kept in step with the OpenBao upstream: the KV v2 path, the local secret, the
# upstream version last written and the local version holding it.
type UpstreamMapping (
  remote: string,
  secret: string,
  remote_version: ?int,
  local_version: ?int,
  synced: ?string,
  note: ?string
)

# Where the OpenBao upstream sync ([upstream] in the config) stands: the machine key, the last
# sync's start, the last one that ended well, the last error, the seconds the token has left.
method UpstreamStatus() -> (
  configured: bool,
  address: ?string,
  role: ?string,
  key: ?string,
  last_attempt: ?string,
  last_success: ?string,
  last_error: ?string,
  token_ttl: ?int,
  mappings: []UpstreamMapping
)

# Sync from the OpenBao upstream now; the reply is UpstreamStatus's, after the sync.
method UpstreamSync() -> (
  configured: bool,
  address: ?string,
  role: ?string,
  key: ?string,
  last_attempt: ?string,
  last_success: ?string,
  last_error: ?string,
  token_ttl: ?int,
  mappings: []UpstreamMapping
)

# Attest a key: the TPM certifies its key (TPM2_Certify); for a PKCS#11 key, its attributes
# signed by the audit key. nonce (base64, 1 to 64 bytes) is bound into the signature; without
# one the daemon picks 32 random bytes.
method AttestKey(name: string, nonce: ?string) -> (attestation: Attestation)

# Changes of secrets as they happen: call it with more (it streams; without more the answer
# is org.varlink.service.ExpectedMore). The first reply, change "watching", says the watch is
# in place; then one reply per change: "put" (name, its new version) or "delete" (name). Only
# secrets the caller may read, and of those, if names is given, only these names (a name
# ending in * is a prefix). Never a value. A caller more than 256 changes behind gets
# WatchOverflow, which ends the call: what it missed is unknown, so read again what it needs.
method WatchSecrets(names: ?[]string) -> (change: string, name: ?string, version: ?int)

error NotInitialized ()
error AlreadyInitialized ()
error Sealed (reason: string)
error NotFound (kind: string, name: string)
error AlreadyExists (kind: string, name: string)
error PermissionDenied (action: string, resource: string)
error InvalidArgument (parameter: string, reason: string)
error TooLarge (parameter: string, limit: int)
error LastKeyslot (id: int)
error DeviceUnavailable (device: string, reason: string)
error PinIncorrect (retries_left: ?int)
error PinLocked (device: string)
error PolicyMismatch (device: string)
error Busy ()
error Internal (reason: string)
# The audit record of the call could not be written: the call was refused, or (for a change
# already made) not acknowledged.
error AuditUnavailable (reason: string)
# A rekey waits for its new recovery shares to be confirmed: keyslots can't change until it
# is confirmed, started over, or lapses.
error RekeyPending (until: string)
# The file system of the daemon's state directory is full: what (the database, the audit log)
# could not be written. The call was refused, or (for a change already made) not acknowledged.
error StorageFull (what: string)
# A WatchSecrets caller fell behind by more changes than the daemon holds for it: missed of
# them were dropped, and the call ends.
error WatchOverflow (missed: int)
"#;

/// A secret value: base64 on the wire, zeroizing bytes in memory, redacted in `Debug`.
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    /// Wrap bytes (zeroized on drop).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The bytes. Callers say why they need them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Take the zeroizing buffer.
    pub fn into_inner(self) -> Zeroizing<Vec<u8>> {
        self.0
    }
}

impl From<Zeroizing<Vec<u8>>> for SecretValue {
    fn from(z: Zeroizing<Vec<u8>>) -> Self {
        Self(z)
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue({} bytes, redacted)", self.0.len())
    }
}

impl Serialize for SecretValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = Zeroizing::new(B64.encode(&*self.0));
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for SecretValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = SecretValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a base64 string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SecretValue, E> {
                if v.len() > MAX_SECRET_LEN.div_ceil(3) * 4 {
                    return Err(E::custom(format!("longer than {MAX_SECRET_LEN} bytes")));
                }
                let mut out = Zeroizing::new(Vec::with_capacity(v.len() / 4 * 3 + 3));
                B64.decode_vec(v, &mut out)
                    .map_err(|_| E::custom("not valid base64"))?;
                Ok(SecretValue(out))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<SecretValue, E> {
                let v = Zeroizing::new(v);
                self.visit_str(&v)
            }
        }
        d.deserialize_str(V)
    }
}

/// Non-secret binary data (public keys, signatures, data to sign): base64 on the wire.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bytes(pub Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'_, str>>::deserialize(d)?;
        B64.decode(s.as_bytes())
            .map(Bytes)
            .map_err(|_| serde::de::Error::custom("not valid base64"))
    }
}

/// One keyslot, as shown to admins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keyslot {
    pub id: u32,
    pub kind: KeyslotKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcrs: Option<Vec<u8>>,
    pub pin: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<u8>,
    /// RFC 3339 UTC.
    pub created: String,
    /// A recovery slot whose shares nobody has confirmed yet: until then it is not counted as
    /// a way in, and after this time (RFC 3339 UTC) it is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unconfirmed_until: Option<String>,
    /// tpm2: the PCRs (sha256 bank) bound through signed policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_pcrs: Option<Vec<u8>>,
    /// tpm2: the fingerprint (hex SHA-256 of the PKCS#1 DER, systemd's `pkfp`) of the key that
    /// signs those policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcr_public_key: Option<String>,
}

/// What to enroll.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotSpec {
    pub kind: KeyslotKind,
    /// The configured device (tpm2, pkcs11).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// tpm2: PCRs of the sha256 bank (default: the device's configured list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcrs: Option<Vec<u8>>,
    /// tpm2: a PIN needed on top of the PCR policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<SecretString>,
    /// recovery: shares needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u8>,
    /// recovery: shares made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<u8>,
    /// tpm2: the PEM public key (RSA) whose signed PCR policies open the slot too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcr_public_key: Option<String>,
    /// tpm2: the PCRs those signed policies cover (default `[11]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_pcrs: Option<Vec<u8>>,
}

impl SlotSpec {
    /// A keyslot of `kind`, everything else left to the daemon's defaults.
    pub fn new(kind: KeyslotKind) -> Self {
        Self {
            kind,
            device: None,
            pcrs: None,
            pin: None,
            threshold: None,
            shares: None,
            pcr_public_key: None,
            signed_pcrs: None,
        }
    }
}

/// A short secret text (a PIN, a recovery share): zeroized, redacted in `Debug`.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretString(pub Zeroizing<String>);

impl SecretString {
    /// Wrap a string.
    pub fn new(s: impl Into<String>) -> Self {
        Self(Zeroizing::new(s.into()))
    }
    /// The text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(redacted)")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub name: String,
    pub kind: DeviceKind,
    pub available: bool,
    /// What the device says it is, or why it is unavailable.
    pub detail: String,
    /// What `CreateKey` can make on it, as probed when it opened (empty while it is down).
    #[serde(default)]
    pub algorithms: Vec<KeyAlgorithm>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretVersion {
    pub version: u64,
    pub term: u32,
    pub created: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub name: String,
    pub device: String,
    pub algorithm: KeyAlgorithm,
    pub created: String,
}

/// A parameterless call.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// The reply of a call that returns nothing (`()`): unlike [`Empty`], a field a newer daemon
/// adds is ignored.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Done {}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    pub initialized: bool,
    pub sealed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsealed_by: Option<String>,
    /// Why the vault is sealed, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub keyslots: Vec<Keyslot>,
    pub devices: Vec<DeviceStatus>,
    /// Recovery shares still needed to unseal, once the first has been given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares_pending: Option<u8>,
    /// The current data-key term, when unsealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u32>,
    pub version: String,
    /// The audit log's current signing key, base64 DER SubjectPublicKeyInfo (Ed25519).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_public_key: Option<String>,
    /// A rekey waits for its new recovery shares to be confirmed until then (RFC 3339 UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rekey_pending_until: Option<String>,
    /// Set when the audit log did not match its anchor as the vault opened: what was found,
    /// and where the old log was put (a new one was started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_finding: Option<String>,
    /// Set when the state directory can't take writes: its file system is (nearly) full, or
    /// audit records of `Status` calls could not be written (how many, since when).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitParams {
    pub slots: Vec<SlotSpec>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InitReply {
    pub keyslots: Vec<Keyslot>,
    /// Printed once; Keyward keeps no copy.
    pub recovery_shares: Vec<SecretString>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollParams {
    pub slot: SlotSpec,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EnrollReply {
    pub keyslot: Keyslot,
    pub recovery_shares: Vec<SecretString>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KeyslotsReply {
    pub keyslots: Vec<Keyslot>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveKeyslotParams {
    pub id: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RekeyParams {
    /// The PIN of PIN-bound TPM slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<SecretString>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RekeyReply {
    /// New shares for every recovery slot, in keyslot order.
    pub recovery_shares: Vec<SecretString>,
    /// With new shares, the rekey waits for [`Request::ConfirmRecovery`] until then (RFC 3339
    /// UTC); the old key and shares stay in force meanwhile. `None`: the rekey is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_until: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmRecoveryParams {
    pub recovery_shares: Vec<SecretString>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ConfirmRecoveryReply {
    /// The recovery keyslots whose shares this call confirmed.
    pub keyslots: Vec<Keyslot>,
    /// A pending rekey took effect.
    pub rekeyed: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RotateReply {
    pub term: u32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnsealParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_share: Option<SecretString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<SecretString>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UnsealReply {
    pub sealed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares_needed: Option<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutSecretParams {
    pub name: SecretName,
    pub value: SecretValue,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VersionReply {
    pub version: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetSecretParams {
    pub name: SecretName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GetSecretReply {
    pub value: SecretValue,
    pub version: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListSecretsParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NamesReply {
    pub names: Vec<String>,
}

/// A call that names one secret.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretNameParams {
    pub name: SecretName,
}

/// A call that names one key.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyNameParams {
    pub name: KeyName,
}

/// A call that names one transit key.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransitKeyParams {
    pub name: TransitKeyName,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VersionsReply {
    pub versions: Vec<SecretVersion>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyParams {
    pub name: KeyName,
    pub device: String,
    pub algorithm: KeyAlgorithm,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PublicKeyReply {
    pub public_key: Bytes,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KeysReply {
    pub keys: Vec<KeyInfo>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignParams {
    pub name: KeyName,
    pub data: Bytes,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prehashed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<SignHash>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SignReply {
    pub signature: Bytes,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptParams {
    /// The transit key.
    pub name: TransitKeyName,
    pub plaintext: SecretValue,
    /// Bound to the ciphertext (not encrypted): the same bytes must come with `Decrypt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub associated_data: Option<Bytes>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EncryptReply {
    /// `vault:v<version>:<base64>`.
    pub ciphertext: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecryptParams {
    /// The transit key.
    pub name: TransitKeyName,
    /// `vault:v<version>:<base64>`, from `Encrypt`.
    pub ciphertext: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub associated_data: Option<Bytes>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DecryptReply {
    pub plaintext: SecretValue,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackupReply {
    /// Names this backup for [`BackupChunkParams`].
    pub id: String,
    /// The file's length in bytes.
    pub size: u64,
    /// The SHA-256 of the whole file (lower-case hex), for the copy to be checked against.
    pub sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupChunkParams {
    pub id: String,
    pub offset: u64,
}

/// A piece of a backup file: sealed blobs and ciphertext, so plain [`Bytes`].
#[derive(Debug, Serialize, Deserialize)]
pub struct BackupChunkReply {
    pub data: Bytes,
}

/// The most [`BackupChunkReply::data`] holds: its base64 fits a frame with room to spare.
pub const BACKUP_CHUNK_LEN: usize = 1024 * 1024;

/// One secret kept in step with the OpenBao upstream (or a mapping that has brought none yet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamMapping {
    /// The KV v2 path on the upstream (a mapping's prefix ends with `/`).
    pub remote: String,
    /// The local secret (a prefix mapping's local prefix, until it brought a secret).
    pub secret: String,
    /// The upstream version last written here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_version: Option<u64>,
    /// The local version that holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_version: Option<u64>,
    /// When it was written (RFC 3339 UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced: Option<String>,
    /// What the last sync found that is not a new value (the upstream deleted it, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Where the OpenBao upstream sync stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamStatusReply {
    /// An `[upstream]` table is configured.
    pub configured: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The vault key that proves the machine's identity (`[upstream] key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The last sync's start (RFC 3339 UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt: Option<String>,
    /// The last sync that ended well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<String>,
    /// Why the last sync failed, while it is the latest word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Seconds the upstream token has left, while the daemon holds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ttl: Option<u64>,
    pub mappings: Vec<UpstreamMapping>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestKeyParams {
    pub name: KeyName,
    /// Bound into the attestation (1 to [`crate::attestation::MAX_NONCE`] bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<Bytes>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AttestKeyReply {
    pub attestation: crate::attestation::Attestation,
}

/// Which secrets `WatchSecrets` watches.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchSecretsParams {
    /// Secret names; one ending in `*` is a prefix. `None` (or empty): every secret the caller
    /// may read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
}

/// What happened to a secret, in a `WatchSecrets` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// The first reply: the watch is in place, nothing changed yet.
    Watching,
    /// A new version was stored (by a client or the upstream sync).
    Put,
    /// The secret was deleted, every version.
    Delete,
}

impl fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Watching => "watching",
            Self::Put => "put",
            Self::Delete => "delete",
        })
    }
}

/// One reply of `WatchSecrets`: a change of a secret (its name, never its value).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretChange {
    pub change: ChangeKind,
    /// The secret (absent in the first, `watching`, reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its new version (a `put` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// Who may call a method, as the daemon's policy sees it. The resource a call names is its
/// audit target ([`Request::target`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone who can reach the daemon (`Status`: whether the vault is sealed).
    Open,
    /// A list, filtered name by name by the daemon.
    Filtered,
    /// A verb on the vault itself.
    Admin,
    /// Reads the named secret.
    ReadSecret,
    /// Changes the named secret.
    WriteSecret,
    /// Creates or destroys the named key.
    ManageKey,
    /// Uses the named key.
    UseKey,
    /// Encrypts under the named transit key.
    Encrypt,
    /// Decrypts with the named transit key.
    Decrypt,
}

/// How a method is audited, which follows from what it changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audit {
    /// `Status`: as a read, but answered even when its record can't be written.
    Report,
    /// Changes nothing: one record before the reply.
    Read,
    /// An admin call that changes nothing: one synced record.
    AdminRead,
    /// Changes a secret or a key: on record before it runs and after.
    Change,
    /// Changes the vault: on record before it runs and after, then a checkpoint.
    AdminChange,
}

impl Audit {
    /// The method changes state (a `started` record precedes it).
    pub fn mutates(self) -> bool {
        matches!(self, Self::Change | Self::AdminChange)
    }
}

/// One method of the interface, as a type: its name, parameters and reply. A client calls any
/// method through it (`Client::request::<methods::GetSecret>(..)`).
pub trait Method {
    /// The short name (`GetSecret`).
    const NAME: &'static str;
    /// What the call carries.
    type Params: Serialize + serde::de::DeserializeOwned;
    /// It answers with a series of replies, the last one without `continues` (Varlink
    /// `more`); a call of it without `more` is refused with `ExpectedMore`.
    const STREAMS: bool;
    /// What it returns (each reply, for a streaming method).
    type Reply: Serialize + serde::de::DeserializeOwned;
}

/// THE method table: every method of `org.keyward.Custodian`, declared once. Each row gives the
/// method's name, parameter and reply types, who may call it ([`Access`]), how it is audited
/// ([`Audit`]), what it names for the audit log and the policy (`target`), and what else its
/// audit record says (`detail`: never a value, PIN, share or digest).
///
/// It hands the rows to `$callback!`, so that everything built per method (here: [`Request`],
/// [`Reply`], [`methods`], [`METHODS`]; in the daemon: its D-Bus members) comes from this one
/// list. A new method is a new row, a handler arm in the daemon's service, and its text in
/// [`INTERFACE_DESCRIPTION`] (a test checks that the two agree).
#[macro_export]
macro_rules! keyward_methods {
    ($callback:ident) => {
        $callback! {
            /// State of the vault and its devices.
            Status($crate::api::Empty) -> $crate::api::StatusReply {
                access: Open, audit: Report,
                target: |_| "vault".into(), detail: |_| None,
            }
            /// Create the vault master key and enroll its first keyslots.
            Init($crate::api::InitParams) -> $crate::api::InitReply {
                access: Admin, audit: AdminChange,
                target: |_| "vault".into(),
                detail: |p| Some(p.slots.iter().map(|s| s.kind.as_str()).collect::<Vec<_>>().join(",")),
            }
            /// Add a keyslot.
            Enroll($crate::api::EnrollParams) -> $crate::api::EnrollReply {
                access: Admin, audit: AdminChange,
                target: |_| "vault".into(),
                detail: |p| Some(match &p.slot.device {
                    Some(d) => format!("{} on {d}", p.slot.kind),
                    None => p.slot.kind.to_string(),
                }),
            }
            /// The keyslots.
            ListKeyslots($crate::api::Empty) -> $crate::api::KeyslotsReply {
                access: Admin, audit: AdminRead,
                target: |_| "vault".into(), detail: |_| None,
            }
            /// Remove a keyslot.
            RemoveKeyslot($crate::api::RemoveKeyslotParams) -> $crate::api::Done {
                access: Admin, audit: AdminChange,
                target: |p| format!("keyslot {}", p.id), detail: |_| None,
            }
            /// A new master key.
            Rekey($crate::api::RekeyParams) -> $crate::api::RekeyReply {
                access: Admin, audit: AdminChange,
                target: |_| "vault".into(), detail: |_| None,
            }
            /// Prove that recovery shares reached a person.
            ConfirmRecovery($crate::api::ConfirmRecoveryParams) -> $crate::api::ConfirmRecoveryReply {
                access: Admin, audit: AdminChange,
                target: |_| "vault".into(), detail: |_| None,
            }
            /// A new data-key term.
            Rotate($crate::api::Empty) -> $crate::api::RotateReply {
                access: Admin, audit: AdminChange,
                target: |_| "vault".into(), detail: |_| None,
            }
            /// Forget the master key.
            Seal($crate::api::Empty) -> $crate::api::Done {
                access: Admin, audit: AdminChange,
                target: |_| "vault".into(), detail: |_| None,
            }
            /// One recovery share, or a PIN.
            Unseal($crate::api::UnsealParams) -> $crate::api::UnsealReply {
                access: Admin, audit: AdminChange,
                target: |_| "vault".into(),
                detail: |p| Some(if p.recovery_share.is_some() { "recovery share" } else { "PIN" }.into()),
            }
            /// Store a new version of a secret.
            PutSecret($crate::api::PutSecretParams) -> $crate::api::VersionReply {
                access: WriteSecret, audit: Change,
                target: |p| p.name.to_string(), detail: |_| None,
            }
            /// A secret's value.
            GetSecret($crate::api::GetSecretParams) -> $crate::api::GetSecretReply {
                access: ReadSecret, audit: Read,
                target: |p| p.name.to_string(), detail: |p| p.version.map(|v| format!("version {v}")),
            }
            /// Names of secrets.
            ListSecrets($crate::api::ListSecretsParams) -> $crate::api::NamesReply {
                access: Filtered, audit: Read,
                target: |p| match &p.prefix {
                    Some(prefix) => format!("{prefix}*"),
                    None => "*".into(),
                },
                detail: |_| None,
            }
            /// A secret's versions.
            SecretVersions($crate::api::SecretNameParams) -> $crate::api::VersionsReply {
                access: ReadSecret, audit: Read,
                target: |p| p.name.to_string(), detail: |_| None,
            }
            /// Delete a secret.
            DeleteSecret($crate::api::SecretNameParams) -> $crate::api::Done {
                access: WriteSecret, audit: Change,
                target: |p| p.name.to_string(), detail: |_| None,
            }
            /// Generate a key pair inside a device.
            CreateKey($crate::api::CreateKeyParams) -> $crate::api::PublicKeyReply {
                access: ManageKey, audit: Change,
                target: |p| p.name.to_string(), detail: |p| Some(format!("{} on {}", p.algorithm, p.device)),
            }
            /// The keys.
            ListKeys($crate::api::Empty) -> $crate::api::KeysReply {
                access: Filtered, audit: Read,
                target: |_| "*".into(), detail: |_| None,
            }
            /// A key's public key.
            PublicKey($crate::api::KeyNameParams) -> $crate::api::PublicKeyReply {
                access: UseKey, audit: Read,
                target: |p| p.name.to_string(), detail: |_| None,
            }
            /// Sign data inside the device.
            Sign($crate::api::SignParams) -> $crate::api::SignReply {
                access: UseKey, audit: Read,
                target: |p| p.name.to_string(),
                detail: |p| {
                    let prehashed = p.prehashed == Some(true);
                    match (prehashed, p.hash) {
                        (false, None) => None,
                        (true, None) => Some("prehashed".into()),
                        (false, Some(h)) => Some(h.to_string()),
                        (true, Some(h)) => Some(format!("prehashed {h}")),
                    }
                },
            }
            /// Destroy a key.
            DeleteKey($crate::api::KeyNameParams) -> $crate::api::Done {
                access: ManageKey, audit: Change,
                target: |p| p.name.to_string(), detail: |_| None,
            }
            /// Create a transit key.
            CreateTransitKey($crate::api::TransitKeyParams) -> $crate::api::VersionReply {
                access: Admin, audit: AdminChange,
                target: |p| format!("transit/{}", p.name), detail: |_| None,
            }
            /// A new version of a transit key.
            RotateTransitKey($crate::api::TransitKeyParams) -> $crate::api::VersionReply {
                access: Admin, audit: AdminChange,
                target: |p| format!("transit/{}", p.name), detail: |_| None,
            }
            /// Encrypt under a transit key.
            Encrypt($crate::api::EncryptParams) -> $crate::api::EncryptReply {
                access: Encrypt, audit: Read,
                target: |p| format!("transit/{}", p.name),
                detail: |p| p.associated_data.as_ref().map(|_| "associated data".into()),
            }
            /// Decrypt with a transit key.
            Decrypt($crate::api::DecryptParams) -> $crate::api::DecryptReply {
                access: Decrypt, audit: Read,
                target: |p| format!("transit/{}", p.name),
                detail: |p| p.ciphertext.split(':').nth(1)
                    .and_then(|v| v.strip_prefix('v'))
                    .filter(|n| (1..=10).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()))
                    .map(|n| format!("key version {n}")),
            }
            /// A backup file of the database.
            Backup($crate::api::Empty) -> $crate::api::BackupReply {
                access: Admin, audit: AdminRead,
                target: |_| "vault".into(), detail: |_| None,
            }
            /// A piece of a backup file.
            BackupChunk($crate::api::BackupChunkParams) -> $crate::api::BackupChunkReply {
                access: Admin, audit: Read,
                target: |p| format!("backup {}", p.id.chars().take(64).collect::<String>()),
                detail: |p| Some(format!("offset {}", p.offset)),
            }
            /// Where the OpenBao upstream sync stands.
            UpstreamStatus($crate::api::Empty) -> $crate::api::UpstreamStatusReply {
                access: Admin, audit: AdminRead,
                target: |_| "upstream".into(), detail: |_| None,
            }
            /// Sync from the OpenBao upstream now, and say how it went.
            UpstreamSync($crate::api::Empty) -> $crate::api::UpstreamStatusReply {
                access: Admin, audit: AdminChange,
                target: |_| "upstream".into(), detail: |_| None,
            }
            /// Attest a key: who made it and where it lives, signed. Anyone who may use the
            /// key may attest it: the document reveals only its public key and how it is kept.
            AttestKey($crate::api::AttestKeyParams) -> $crate::api::AttestKeyReply {
                access: UseKey, audit: Read,
                target: |p| p.name.to_string(), detail: |_| None,
            }
            /// Changes of secrets as they happen (a streaming call: Varlink `more`). Audited
            /// once, as a read, when the watch starts; each change is shown only to a caller
            /// the policy lets read that secret, when it happens.
            WatchSecrets($crate::api::WatchSecretsParams) -> $crate::api::SecretChange {
                access: Filtered, audit: Read,
                target: |p| match &p.names {
                    Some(names) if !names.is_empty() => names.join(","),
                    _ => "*".into(),
                },
                detail: |_| None, streams: true,
            }
        }
    };
}

/// Builds the per-method types and functions from the rows of [`keyward_methods`].
macro_rules! declare {
    ($(
        $(#[$doc:meta])*
        $name:ident($params:ty) -> $reply:ty {
            access: $access:ident, audit: $audit:ident,
            target: $target:expr, detail: $detail:expr $(, streams: $streams:literal)? $(,)?
        }
    )*) => {
        /// Every call of the interface, with its parameters. Transports build one of these and
        /// hand it to the daemon's service layer.
        #[derive(Debug)]
        pub enum Request {
            $( $(#[$doc])* $name($params), )*
        }

        /// Every reply, one per method; on the wire, just the reply's parameters.
        #[derive(Debug)]
        pub enum Reply {
            $( $(#[$doc])* $name($reply), )*
        }

        impl Serialize for Reply {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self {
                    $( Self::$name(r) => r.serialize(s), )*
                }
            }
        }

        /// Every method as a type, for [`Method`]-generic callers.
        pub mod methods {
            $(
                $(#[$doc])*
                #[derive(Clone, Copy, Debug)]
                pub struct $name;

                impl super::Method for $name {
                    const NAME: &'static str = stringify!($name);
                    const STREAMS: bool = false $(|| $streams)?;
                    type Params = $params;
                    type Reply = $reply;
                }
            )*
        }

        /// The short names of every method, in the table's order.
        pub const METHODS: &[&str] = &[$(stringify!($name)),*];

        /// Whether the method of this short name streams its replies (the table's
        /// `streams: true`; [`Method::STREAMS`]).
        pub fn method_streams(method: &str) -> bool {
            const STREAMS: &[(&str, bool)] = &[$((stringify!($name), false $(|| $streams)?)),*];
            STREAMS.iter().any(|&(m, streams)| streams && m == method)
        }

        impl Request {
            /// The method's short name (`GetSecret`), for logs, audit and policy.
            pub fn method(&self) -> &'static str {
                match self {
                    $( Self::$name(_) => stringify!($name), )*
                }
            }

            /// Build a request from a method's short name and its JSON parameters (`None` or
            /// `{}` for none).
            ///
            /// # Errors
            /// [`ApiError::MethodNotFound`] for an unknown method, [`ApiError::InvalidParameter`]
            /// for parameters that don't fit (a missing or unknown field, a wrong type, bad
            /// base64), [`ApiError::InvalidArgument`] for a value the contract refuses (a bad
            /// name, an unknown algorithm: see [`crate::Invalid`]).
            pub fn parse(method: &str, params: Option<&str>) -> Result<Self, ApiError> {
                fn p<'a, T: Deserialize<'a>>(params: Option<&'a str>) -> Result<T, ApiError> {
                    serde_json::from_str(params.unwrap_or("{}")).map_err(|e| {
                        match $crate::invalid::Invalid::from_serde(&e) {
                            Some((parameter, reason)) => {
                                ApiError::InvalidArgument { parameter, reason }
                            }
                            None => ApiError::InvalidParameter {
                                parameter: field_of(&e.to_string()),
                            },
                        }
                    })
                }
                match method {
                    $( stringify!($name) => Ok(Self::$name(p(params)?)), )*
                    _ => Err(ApiError::MethodNotFound {
                        method: format!("{INTERFACE}.{method}"),
                    }),
                }
            }

            /// Who may call it.
            pub fn access(&self) -> Access {
                match self {
                    $( Self::$name(_) => Access::$access, )*
                }
            }

            /// It streams: answered by a series of replies (Varlink `more`), the table's
            /// `streams: true`.
            pub fn streams(&self) -> bool {
                match self {
                    $( Self::$name(_) => false $(|| $streams)?, )*
                }
            }

            /// How it is audited.
            pub fn audit(&self) -> Audit {
                match self {
                    $( Self::$name(_) => Audit::$audit, )*
                }
            }

            /// What it names, for the audit log, the logs and the policy (names only, never
            /// values): the secret or key, `keyslot N`, a list's pattern, or `vault`.
            pub fn target(&self) -> String {
                match self {
                    $( Self::$name(p) => {
                        let f: fn(&$params) -> String = $target;
                        f(p)
                    } )*
                }
            }

            /// What else its audit record says: which version, device or kind of slot; never a
            /// value, PIN, share or digest.
            pub fn detail(&self) -> Option<String> {
                match self {
                    $( Self::$name(p) => {
                        let f: fn(&$params) -> Option<String> = $detail;
                        f(p)
                    } )*
                }
            }
        }
    };
}

crate::keyward_methods!(declare);

/// Best effort at naming the offending field from a serde_json message, for
/// `InvalidParameter`. Never includes the value (it may be a secret).
fn field_of(message: &str) -> String {
    for marker in ["missing field `", "unknown field `"] {
        if let Some(rest) = message.split(marker).nth(1) {
            if let Some(name) = rest.split('`').next() {
                return name.to_owned();
            }
        }
    }
    "parameters".to_owned()
}

/// Every error the interface returns: the `org.keyward.Custodian.*` errors, plus the
/// `org.varlink.service.*` protocol errors, plus [`ApiError::Other`] for a name this side does
/// not know.
///
/// The wire form (name and parameters) is serde's: a variant's name is its error's name within
/// the interface (protocol errors are renamed to their full name), its fields are the error's
/// parameters. So an error is declared once, here, and [`ApiError::name`],
/// [`ApiError::parameters`] and [`ApiError::from_wire`] follow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", content = "parameters")]
pub enum ApiError {
    #[error("the vault is not initialised: run `keyward init`")]
    NotInitialized,
    #[error("the vault is already initialised")]
    AlreadyInitialized,
    #[error("the vault is sealed ({reason}): run `keyward unseal` or check `keyward status`")]
    Sealed { reason: String },
    #[error("{kind} {name:?} not found")]
    NotFound { kind: String, name: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: String, name: String },
    #[error("permission denied: {action} on {resource:?}")]
    PermissionDenied { action: String, resource: String },
    #[error("invalid {parameter}: {reason}")]
    InvalidArgument { parameter: String, reason: String },
    #[error("{parameter} is larger than {limit} bytes")]
    TooLarge { parameter: String, limit: u64 },
    #[error(
        "keyslot {id} is the last way into the vault: add another keyslot first, or use --force"
    )]
    LastKeyslot { id: u32 },
    #[error("device {device:?} unavailable: {reason}")]
    DeviceUnavailable { device: String, reason: String },
    #[error("PIN incorrect{}", .retries_left.map(|n| format!(" ({n} tries left)")).unwrap_or_default())]
    PinIncorrect {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retries_left: Option<u32>,
    },
    #[error("PIN locked on device {device:?}")]
    PinLocked { device: String },
    #[error(
        "device {device:?} refuses to unseal: its PCR values changed since the slot was enrolled"
    )]
    PolicyMismatch { device: String },
    #[error("the daemon is busy: try again")]
    Busy,
    #[error("internal error: {reason}")]
    Internal { reason: String },
    /// Fail closed: what can't be audited isn't done (or, done, isn't acknowledged).
    #[error("the audit log cannot be written ({reason}): the request was not carried out or not acknowledged")]
    AuditUnavailable { reason: String },
    #[error("a rekey waits for its new recovery shares until {until}: confirm them (`keyward rekey --confirm-from FILE`) or start over (`keyward rekey`)")]
    RekeyPending { until: String },
    /// The disk, not a bug: the admin frees space and the daemon serves again.
    #[error("the file system of keywardd's state directory is full: the {what} could not be written, so the request was refused (or, if already carried out, not acknowledged); free space there and retry (`keyward status` shows it)")]
    StorageFull { what: String },
    /// A watcher that did not keep up: the daemon holds a bounded number of changes for it.
    #[error("this watch fell {missed} change(s) behind and was ended: read again what you need and watch anew")]
    WatchOverflow { missed: u64 },
    /// `org.varlink.service.MethodNotFound`.
    #[serde(rename = "org.varlink.service.MethodNotFound")]
    #[error("no such method {method:?}")]
    MethodNotFound { method: String },
    /// `org.varlink.service.InterfaceNotFound`.
    #[serde(rename = "org.varlink.service.InterfaceNotFound")]
    #[error("no such interface {interface:?}")]
    InterfaceNotFound { interface: String },
    /// `org.varlink.service.InvalidParameter`.
    #[serde(rename = "org.varlink.service.InvalidParameter")]
    #[error("invalid parameter {parameter:?}")]
    InvalidParameter { parameter: String },
    /// `org.varlink.service.ExpectedMore`: a streaming method called without `more`.
    #[serde(rename = "org.varlink.service.ExpectedMore")]
    #[error("this method streams its replies: call it with more")]
    ExpectedMore,
    /// An error name this client does not know (a newer daemon), or a known name whose
    /// parameters don't fit.
    #[error("{name}: {parameters}")]
    #[serde(skip)]
    Other { name: String, parameters: String },
}

impl From<crate::Invalid> for ApiError {
    fn from(e: crate::Invalid) -> Self {
        Self::InvalidArgument {
            parameter: e.parameter.to_owned(),
            reason: e.reason,
        }
    }
}

impl ApiError {
    /// The Varlink error name (`org.keyward.Custodian.NotFound`).
    pub fn name(&self) -> String {
        let (tag, _) = self.wire();
        if tag.contains('.') {
            tag
        } else {
            format!("{INTERFACE}.{tag}")
        }
    }

    /// The name within `org.keyward.Custodian` (`NotFound`) for the interface's own errors, as
    /// the audit log writes it; the full name for any other (`org.varlink.service.*`).
    pub fn short_name(&self) -> String {
        let name = self.name();
        match name
            .strip_prefix(INTERFACE)
            .and_then(|rest| rest.strip_prefix('.'))
        {
            Some(short) => short.to_owned(),
            None => name,
        }
    }

    /// The last element of the name (`NotFound`, `InvalidParameter`): the reason, whichever
    /// interface names it, for transports that name errors their own way (D-Bus).
    pub fn reason(&self) -> String {
        let name = self.name();
        name.rsplit('.').next().unwrap_or_default().to_owned()
    }

    /// The error's parameters as a JSON object.
    pub fn parameters(&self) -> serde_json::Value {
        self.wire().1
    }

    /// The serde tag (the name within the interface, or a full name) and the parameters.
    fn wire(&self) -> (String, serde_json::Value) {
        let empty = || serde_json::Value::Object(serde_json::Map::new());
        if let Self::Other { name, parameters } = self {
            let parameters = serde_json::from_str(parameters)
                .ok()
                .filter(serde_json::Value::is_object);
            return (name.clone(), parameters.unwrap_or_else(empty));
        }
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut m)) => {
                let tag = match m.remove("error") {
                    Some(serde_json::Value::String(tag)) => tag,
                    _ => "Internal".to_owned(),
                };
                (tag, m.remove("parameters").unwrap_or_else(empty))
            }
            // Every variant but `Other` serializes to a tagged object.
            _ => ("Internal".to_owned(), empty()),
        }
    }

    /// Rebuild an error from its Varlink name and parameters (the client side). A name this
    /// side does not know, or parameters that don't fit it, give [`ApiError::Other`].
    pub fn from_wire(name: &str, parameters: &serde_json::Value) -> Self {
        let tag = name
            .strip_prefix(INTERFACE)
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or(name);
        let mut wire = serde_json::Map::new();
        wire.insert("error".into(), tag.into());
        // Serde wants no content at all for a variant without fields.
        if parameters.as_object().is_none_or(|p| !p.is_empty()) {
            wire.insert("parameters".into(), parameters.clone());
        }
        let known = serde_json::from_value::<Self>(serde_json::Value::Object(wire.clone()))
            .or_else(|_| {
                // A variant whose fields are all optional, sent with none of them.
                wire.insert("parameters".into(), parameters.clone());
                serde_json::from_value::<Self>(serde_json::Value::Object(wire))
            });
        // Only names this interface or the protocol give: `org.example.NotFound` is not ours.
        match known {
            Ok(e) if e.name() == name => e,
            _ => Self::Other {
                name: name.to_owned(),
                parameters: parameters.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod interface_text;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_value_round_trip_and_redaction() {
        let v: SecretValue = serde_json::from_str("\"aHVudGVyMg==\"").unwrap();
        assert_eq!(v.expose(), b"hunter2");
        assert!(!format!("{v:?}").contains("hunter2"));
        assert_eq!(serde_json::to_string(&v).unwrap(), "\"aHVudGVyMg==\"");
        assert!(serde_json::from_str::<SecretValue>("\"not base64!\"").is_err());
    }

    #[test]
    fn parse_names_the_bad_field_not_the_value() {
        let e = Request::parse("PutSecret", Some(r#"{"name":"a","valu":"c2VjcmV0"}"#)).unwrap_err();
        assert_eq!(
            e,
            ApiError::InvalidParameter {
                parameter: "valu".into()
            }
        );
        let e = Request::parse("PutSecret", Some(r#"{"name":"a"}"#)).unwrap_err();
        assert_eq!(
            e,
            ApiError::InvalidParameter {
                parameter: "value".into()
            }
        );
        let e = Request::parse("GetSecrets", None).unwrap_err();
        assert!(matches!(e, ApiError::MethodNotFound { .. }));
        assert!(matches!(
            Request::parse("Status", None),
            Ok(Request::Status(_))
        ));
        assert!(Request::parse("Status", Some(r#"{"x":1}"#)).is_err());
    }

    /// The names and parameters clients already parse, spelled out.
    #[test]
    fn the_wire_form_of_errors_is_the_documented_one() {
        use serde_json::json;
        let cases = [
            (ApiError::Busy, "org.keyward.Custodian.Busy", json!({})),
            (
                ApiError::PinIncorrect { retries_left: None },
                "org.keyward.Custodian.PinIncorrect",
                json!({}),
            ),
            (
                ApiError::PinIncorrect {
                    retries_left: Some(2),
                },
                "org.keyward.Custodian.PinIncorrect",
                json!({ "retries_left": 2 }),
            ),
            (
                ApiError::TooLarge {
                    parameter: "value".into(),
                    limit: 9,
                },
                "org.keyward.Custodian.TooLarge",
                json!({ "parameter": "value", "limit": 9 }),
            ),
            (
                ApiError::InvalidParameter {
                    parameter: "name".into(),
                },
                "org.varlink.service.InvalidParameter",
                json!({ "parameter": "name" }),
            ),
            (
                ApiError::Other {
                    name: "com.example.Odd".into(),
                    parameters: r#"{"a":1}"#.into(),
                },
                "com.example.Odd",
                json!({ "a": 1 }),
            ),
        ];
        for (e, name, parameters) in cases {
            assert_eq!(e.name(), name);
            assert_eq!(e.parameters(), parameters, "{name}");
        }
        let e = ApiError::NotFound {
            kind: "secret".into(),
            name: "a".into(),
        };
        assert_eq!(
            (e.short_name().as_str(), e.reason().as_str()),
            ("NotFound", "NotFound")
        );
        let e = ApiError::MethodNotFound { method: "m".into() };
        assert_eq!(e.short_name(), "org.varlink.service.MethodNotFound");
        assert_eq!(e.reason(), "MethodNotFound");
        // Another interface's error of the same short name is not ours.
        assert!(matches!(
            ApiError::from_wire("com.example.NotFound", &json!({"kind": "k", "name": "n"})),
            ApiError::Other { .. }
        ));
        // Known name, parameters that don't fit: kept as they came.
        assert!(matches!(
            ApiError::from_wire("org.keyward.Custodian.LastKeyslot", &json!({"id": "x"})),
            ApiError::Other { .. }
        ));
    }

    #[test]
    fn errors_round_trip_through_the_wire_form() {
        let all = [
            ApiError::Sealed {
                reason: "no slot".into(),
            },
            ApiError::NotFound {
                kind: "secret".into(),
                name: "db".into(),
            },
            ApiError::PinIncorrect {
                retries_left: Some(2),
            },
            ApiError::LastKeyslot { id: 3 },
            ApiError::StorageFull {
                what: "audit log".into(),
            },
            ApiError::InvalidParameter {
                parameter: "name".into(),
            },
            ApiError::Busy,
        ];
        for e in all {
            assert_eq!(ApiError::from_wire(&e.name(), &e.parameters()), e);
        }
    }
}

/// Generated calls and errors: every request a client can send parses to the same request,
/// every error survives the wire, and no input panics the parser or is quoted in its errors.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::option::of;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        "\\PC{0,16}|[\\x00-\\x1f\"\\\\]{0,4}"
    }

    /// A valid name, of either kind.
    fn name<N: TryFrom<String> + fmt::Debug>() -> impl Strategy<Value = N> {
        "[a-z0-9@+=][a-z0-9._@+=-]{0,12}(/[a-z0-9_-]{1,8}){0,2}"
            .prop_filter_map("a valid name", |s| N::try_from(s).ok())
    }

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..48)
    }

    fn error() -> impl Strategy<Value = ApiError> {
        prop_oneof![
            Just(ApiError::NotInitialized),
            Just(ApiError::AlreadyInitialized),
            Just(ApiError::Busy),
            text().prop_map(|reason| ApiError::Sealed { reason }),
            (text(), text()).prop_map(|(kind, name)| ApiError::NotFound { kind, name }),
            (text(), text()).prop_map(|(kind, name)| ApiError::AlreadyExists { kind, name }),
            (text(), text())
                .prop_map(|(action, resource)| ApiError::PermissionDenied { action, resource }),
            (text(), text())
                .prop_map(|(parameter, reason)| ApiError::InvalidArgument { parameter, reason }),
            (text(), any::<u64>())
                .prop_map(|(parameter, limit)| ApiError::TooLarge { parameter, limit }),
            any::<u32>().prop_map(|id| ApiError::LastKeyslot { id }),
            (text(), text())
                .prop_map(|(device, reason)| ApiError::DeviceUnavailable { device, reason }),
            of(any::<u32>()).prop_map(|retries_left| ApiError::PinIncorrect { retries_left }),
            text().prop_map(|device| ApiError::PinLocked { device }),
            text().prop_map(|device| ApiError::PolicyMismatch { device }),
            text().prop_map(|reason| ApiError::Internal { reason }),
            text().prop_map(|reason| ApiError::AuditUnavailable { reason }),
            text().prop_map(|until| ApiError::RekeyPending { until }),
            text().prop_map(|what| ApiError::StorageFull { what }),
            text().prop_map(|method| ApiError::MethodNotFound { method }),
            text().prop_map(|interface| ApiError::InterfaceNotFound { interface }),
            text().prop_map(|parameter| ApiError::InvalidParameter { parameter }),
            (
                "com\\.example\\.[A-Za-z]{1,10}",
                proptest::collection::btree_map("[a-z]{1,6}", text(), 0..3)
            )
                .prop_map(|(name, map)| ApiError::Other {
                    name,
                    parameters: serde_json::to_string(&map).unwrap_or_default(),
                }),
        ]
    }

    /// A request as a client builds it: the method, its parameters as JSON, and what the
    /// daemon must read from them (compared as a debug-free summary).
    fn call() -> impl Strategy<Value = (&'static str, serde_json::Value, String)> {
        use serde_json::json;
        prop_oneof![
            (name::<SecretName>(), bytes()).prop_map(|(name, value)| {
                let params = serde_json::to_value(PutSecretParams {
                    name: name.clone(),
                    value: SecretValue::new(value.clone()),
                });
                (
                    "PutSecret",
                    params.unwrap_or_default(),
                    format!("{name:?} {value:?}"),
                )
            }),
            (name::<SecretName>(), of(any::<u64>())).prop_map(|(name, version)| {
                let params = json!(GetSecretParams {
                    name: name.clone(),
                    version
                });
                ("GetSecret", params, format!("{name:?} {version:?}"))
            }),
            of(text()).prop_map(|prefix| {
                let params = json!(ListSecretsParams {
                    prefix: prefix.clone()
                });
                ("ListSecrets", params, format!("{prefix:?}"))
            }),
            name::<SecretName>().prop_map(|name| (
                "DeleteSecret",
                json!({ "name": name }),
                format!("{name:?}")
            )),
            (
                name::<KeyName>(),
                text(),
                proptest::sample::select(&KeyAlgorithm::ALL[..])
            )
                .prop_map(|(name, device, algorithm)| {
                    let params = json!(CreateKeyParams {
                        name: name.clone(),
                        device: device.clone(),
                        algorithm,
                    });
                    (
                        "CreateKey",
                        params,
                        format!("{name:?} {device:?} {algorithm:?}"),
                    )
                }),
            (
                name::<KeyName>(),
                bytes(),
                of(any::<bool>()),
                of(proptest::sample::select(SignHash::ALL.to_vec()))
            )
                .prop_map(|(name, data, prehashed, hash)| {
                    let params = json!(SignParams {
                        name: name.clone(),
                        data: Bytes(data.clone()),
                        prehashed,
                        hash,
                    });
                    (
                        "Sign",
                        params,
                        format!("{name:?} {data:?} {prehashed:?} {hash:?}"),
                    )
                }),
            (of(text()), of(text())).prop_map(|(share, pin)| {
                let params = json!(UnsealParams {
                    recovery_share: share.clone().map(SecretString::new),
                    pin: pin.clone().map(SecretString::new),
                });
                ("Unseal", params, format!("{share:?} {pin:?}"))
            }),
            (any::<u32>(), of(any::<bool>())).prop_map(|(id, force)| {
                let params = json!(RemoveKeyslotParams { id, force });
                ("RemoveKeyslot", params, format!("{id} {force:?}"))
            }),
            (
                proptest::sample::select(&KeyslotKind::ALL[..]),
                of(text()),
                of(proptest::collection::vec(0u8..24, 0..4)),
                of(any::<u8>())
            )
                .prop_map(|(kind, device, pcrs, threshold)| {
                    let params = json!(EnrollParams {
                        slot: SlotSpec {
                            kind,
                            device: device.clone(),
                            pcrs: pcrs.clone(),
                            pin: None,
                            threshold,
                            shares: threshold,
                            pcr_public_key: None,
                            signed_pcrs: None,
                        }
                    });
                    (
                        "Enroll",
                        params,
                        format!("{kind:?} {device:?} {pcrs:?} {threshold:?}"),
                    )
                }),
        ]
    }

    /// What the daemon read, in the same form as [`call`]'s summary.
    fn summary(request: &Request) -> String {
        match request {
            Request::PutSecret(p) => format!("{:?} {:?}", p.name, p.value.expose()),
            Request::GetSecret(p) => format!("{:?} {:?}", p.name, p.version),
            Request::ListSecrets(p) => format!("{:?}", p.prefix),
            Request::DeleteSecret(p) => format!("{:?}", p.name),
            Request::CreateKey(p) => format!("{:?} {:?} {:?}", p.name, p.device, p.algorithm),
            Request::Sign(p) => {
                format!("{:?} {:?} {:?} {:?}", p.name, p.data.0, p.prehashed, p.hash)
            }
            Request::Unseal(p) => format!(
                "{:?} {:?}",
                p.recovery_share.as_ref().map(SecretString::expose),
                p.pin.as_ref().map(SecretString::expose)
            ),
            Request::RemoveKeyslot(p) => format!("{} {:?}", p.id, p.force),
            Request::Enroll(p) => format!(
                "{:?} {:?} {:?} {:?}",
                p.slot.kind, p.slot.device, p.slot.pcrs, p.slot.threshold
            ),
            other => other.method().to_owned(),
        }
    }

    proptest! {
        #[test]
        fn errors_survive_the_wire(e in error()) {
            prop_assert_eq!(ApiError::from_wire(&e.name(), &e.parameters()), e);
        }

        #[test]
        fn requests_parse_to_what_was_sent((method, params, expect) in call()) {
            let text = params.to_string();
            let request = Request::parse(method, Some(&text))
                .map_err(|e| TestCaseError::fail(format!("{method}: {e}")))?;
            prop_assert_eq!(request.method(), method);
            prop_assert_eq!(summary(&request), expect);
        }

        /// Any text as a name: the name, or `InvalidArgument` naming the parameter.
        #[test]
        fn names_are_checked_while_parsing(given in text()) {
            let params = serde_json::json!({ "name": given }).to_string();
            match Request::parse("DeleteSecret", Some(&params)) {
                Ok(Request::DeleteSecret(p)) => prop_assert_eq!(p.name.as_str(), given.as_str()),
                Ok(other) => prop_assert!(false, "{}", other.method()),
                Err(ApiError::InvalidArgument { parameter, reason }) => {
                    prop_assert_eq!(parameter, "name");
                    prop_assert!(SecretName::try_from(given.as_str()).is_err(), "{}", reason);
                }
                Err(e) => prop_assert!(false, "{}", e),
            }
        }

        #[test]
        fn arbitrary_calls_never_panic(method in "[A-Za-z]{0,16}", params in of("\\PC{0,64}")) {
            let _ = Request::parse(&method, params.as_deref());
        }

        /// A secret that does not decode is refused without being quoted.
        #[test]
        fn bad_secrets_are_never_quoted(secret in "[!#%&]{1,4}[a-zA-Z0-9]{8,24}", field in "value|valu|name") {
            let params = serde_json::json!({ "name": "n", field.as_str(): secret }).to_string();
            if let Err(e) = Request::parse("PutSecret", Some(&params)) {
                prop_assert!(!e.to_string().contains(&secret), "{}", e);
                prop_assert!(!e.parameters().to_string().contains(&secret), "{}", e);
            }
        }
    }
}
