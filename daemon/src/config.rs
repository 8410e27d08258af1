//! `keywardd.toml`: where the state lives, which sockets to serve, which devices to use and in
//! which order to try them at start. Unknown keys are errors, so a typo never silently turns a
//! protection off. PINs are never in this file: only the path of a file that holds one (a
//! systemd credential, typically).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hsm_shim::tpm::TpmConfig;
use hsm_shim::uri::Pkcs11Uri;
use serde::Deserialize;

/// Default path of the config file.
pub const DEFAULT_CONFIG: &str = "/etc/keyward/keywardd.toml";

/// A config that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The whole configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the database lives (mode 0700).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The Varlink API socket.
    #[serde(default)]
    pub api: ApiConfig,
    /// systemd's `LoadCredential=` socket. Off unless configured.
    #[serde(default)]
    pub credentials: Option<CredentialsConfig>,
    /// The D-Bus service. Off unless configured.
    #[serde(default)]
    pub dbus: Option<DbusConfig>,
    /// The policy file (TOML). Without one, everything but `Status` is denied.
    #[serde(default)]
    pub policy: Option<PathBuf>,
    /// Device names to try, in order, for the unattended unseal at start. Default: every
    /// configured device, in name order. Recovery slots are never tried unattended.
    #[serde(default)]
    pub unseal_order: Option<Vec<String>>,
    /// The devices, by the name keyslots and keys refer to (`tpm`, `hsm`, ...).
    #[serde(default)]
    pub devices: BTreeMap<String, DeviceConfig>,
    /// Limits on what clients can make the daemon do.
    #[serde(default)]
    pub limits: Limits,
    /// Recovery shares.
    #[serde(default)]
    pub recovery: RecoveryConfig,
    /// How the audit log is kept.
    #[serde(default)]
    pub audit: AuditConfig,
}

/// Recovery shares: how long new ones wait for an admin to type enough of them back.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryConfig {
    /// New shares (from init, enroll or rekey) that are not confirmed within this time
    /// lapse: an unconfirmed keyslot is dropped, a pending rekey is forgotten.
    #[serde(default = "default_confirm_within")]
    pub confirm_within_secs: u64,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        Self {
            confirm_within_secs: default_confirm_within(),
        }
    }
}

fn default_confirm_within() -> u64 {
    3600
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/keyward")
}

/// The Varlink socket.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Path of the socket (ignored under socket activation).
    #[serde(default = "default_api_socket")]
    pub socket: PathBuf,
    /// Permission bits of the socket, octal as a string ("0660").
    #[serde(default = "default_mode")]
    pub mode: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            socket: default_api_socket(),
            mode: default_mode(),
        }
    }
}

fn default_api_socket() -> PathBuf {
    PathBuf::from("/run/keyward/api.sock")
}

fn default_mode() -> String {
    "0660".into()
}

impl ApiConfig {
    /// The socket mode as bits.
    ///
    /// # Errors
    /// A mode that isn't octal or grants more than `0777`.
    pub fn mode_bits(&self) -> Result<u32, String> {
        let bits = u32::from_str_radix(self.mode.trim_start_matches("0o"), 8).map_err(|_| {
            format!(
                "api.mode {:?} is not an octal mode like \"0660\"",
                self.mode
            )
        })?;
        if bits > 0o777 {
            return Err(format!("api.mode {:?} has bits beyond 0777", self.mode));
        }
        Ok(bits)
    }
}

/// The credential socket that systemd connects to for `LoadCredential=ID:PATH`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsConfig {
    /// Path of the socket (ignored under socket activation).
    #[serde(default = "default_credentials_socket")]
    pub socket: PathBuf,
    /// Permission bits, octal ("0600": only systemd, which runs as root, connects).
    #[serde(default = "default_credentials_mode")]
    pub mode: String,
    /// How long a request may wait for the vault to be unsealed at boot before it gets nothing.
    #[serde(default = "default_credentials_wait")]
    pub wait_unsealed_secs: u64,
}

fn default_credentials_socket() -> PathBuf {
    PathBuf::from("/run/keyward/credentials.sock")
}

fn default_credentials_mode() -> String {
    "0600".into()
}

fn default_credentials_wait() -> u64 {
    60
}

impl CredentialsConfig {
    /// The socket mode as bits.
    ///
    /// # Errors
    /// A mode that isn't octal or grants more than `0777`.
    pub fn mode_bits(&self) -> Result<u32, String> {
        parse_mode("credentials.mode", &self.mode)
    }
}

/// Which bus the D-Bus service joins.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbusConfig {
    /// `system` (default) or `session`; ignored when `address` is set.
    #[serde(default = "default_bus")]
    pub bus: String,
    /// An explicit bus address (`unix:path=…`), e.g. a private bus in tests.
    #[serde(default)]
    pub address: Option<String>,
}

fn default_bus() -> String {
    "system".into()
}

fn parse_mode(what: &str, mode: &str) -> Result<u32, String> {
    let bits = u32::from_str_radix(mode.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{what} {mode:?} is not an octal mode like \"0660\""))?;
    if bits > 0o777 {
        return Err(format!("{what} {mode:?} has bits beyond 0777"));
    }
    Ok(bits)
}

/// Bounds on client-controlled resources.
///
/// Connections are counted per uid (from the kernel) so that one user can't take every slot:
/// a connection beyond a bound is answered at once with the error `Busy` and closed, never
/// left waiting. The last `root_reserve` slots are root's alone, so an administrator gets in
/// even when other users fill the rest.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Connections served at once, all users together.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections one uid may hold at once (root included).
    #[serde(default = "default_max_connections_per_uid")]
    pub max_connections_per_uid: usize,
    /// Of `max_connections`, how many only uid 0 may use.
    #[serde(default = "default_root_reserve")]
    pub root_reserve: usize,
    /// A connection that holds no request (none running, none being received) is closed after
    /// this long; so is one that doesn't take its reply. Short, because an idle connection
    /// holds a slot. Clients connect again when they need to (the Rust client does so by
    /// itself).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// How long a request may wait for a device before `DeviceUnavailable`.
    #[serde(default = "default_device_timeout")]
    pub device_timeout_secs: u64,
    /// Requests queued per device before callers get `Busy`.
    #[serde(default = "default_device_queue")]
    pub device_queue: usize,
    /// How often every device is pinged, so `STATUS=` says a device went away (or came back)
    /// without waiting for a request to find out.
    #[serde(default = "default_device_watch")]
    pub device_watch_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_connections_per_uid: default_max_connections_per_uid(),
            root_reserve: default_root_reserve(),
            idle_timeout_secs: default_idle_timeout(),
            device_timeout_secs: default_device_timeout(),
            device_queue: default_device_queue(),
            device_watch_secs: default_device_watch(),
        }
    }
}

impl Limits {
    /// The bounds must leave every user, and root, at least one connection.
    fn check(&self) -> Result<(), String> {
        if self.max_connections == 0
            || self.max_connections_per_uid == 0
            || self.device_queue == 0
            || self.idle_timeout_secs == 0
            || self.device_watch_secs == 0
        {
            return Err("limits must be at least 1".into());
        }
        if self.root_reserve >= self.max_connections {
            return Err(format!(
                "limits.root_reserve ({}) must be below limits.max_connections ({}): \
                 other users need a slot too",
                self.root_reserve, self.max_connections
            ));
        }
        Ok(())
    }
}

fn default_max_connections() -> usize {
    256
}
fn default_max_connections_per_uid() -> usize {
    64
}
fn default_root_reserve() -> usize {
    16
}
fn default_idle_timeout() -> u64 {
    10
}
fn default_device_timeout() -> u64 {
    30
}
fn default_device_queue() -> usize {
    64
}
fn default_device_watch() -> u64 {
    15
}

/// One device.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum DeviceConfig {
    /// A TPM 2.0.
    Tpm2 {
        /// `device:/dev/tpmrm0` (default) or `swtpm:host=…,port=…`.
        #[serde(default)]
        tcti: hsm_shim::tpm::Tcti,
        /// Default PCRs of the sha256 bank for new tpm2 keyslots.
        #[serde(default = "default_pcrs")]
        pcrs: Vec<u8>,
    },
    /// A PKCS#11 token.
    Pkcs11 {
        /// The module (shared library).
        module: PathBuf,
        /// The token, by a PKCS#11 URI that names it (`pkcs11:token=…`).
        token: Box<Pkcs11Uri>,
        /// File holding the user PIN (a systemd credential). Never the PIN itself.
        #[serde(default)]
        pin_file: Option<PathBuf>,
        /// For SoftHSM: its config file, exported as `SOFTHSM2_CONF` at start. Keyward never
        /// lets SoftHSM fall back to `/etc/softhsm/softhsm2.conf`.
        #[serde(default)]
        softhsm_conf: Option<PathBuf>,
        /// `CKA_LABEL` of the sealing key.
        #[serde(default = "default_seal_key_label")]
        seal_key_label: String,
    },
}

fn default_pcrs() -> Vec<u8> {
    vec![7]
}

fn default_seal_key_label() -> String {
    "keyward-seal".into()
}

impl DeviceConfig {
    /// `tpm2` or `pkcs11`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Tpm2 { .. } => "tpm2",
            Self::Pkcs11 { .. } => "pkcs11",
        }
    }

    /// The TPM config, for a TPM.
    pub fn tpm_config(&self) -> Option<TpmConfig> {
        match self {
            Self::Tpm2 { tcti, pcrs } => Some(TpmConfig {
                tcti: tcti.clone(),
                pcrs: pcrs.clone(),
            }),
            Self::Pkcs11 { .. } => None,
        }
    }
}

/// Device names must be short identifiers: they appear in keyslots, key records and logs.
fn check_device_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "device name {name:?}: use 1 to 32 of a-z, 0-9, '-' and '_'"
        ))
    }
}

impl Config {
    /// Load and check a config file.
    ///
    /// # Errors
    /// The file can't be read, isn't valid TOML, has unknown keys, or is inconsistent.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.check().map_err(|reason| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        self.api.mode_bits()?;
        if let Some(c) = &self.credentials {
            c.mode_bits()?;
        }
        if let Some(d) = &self.dbus {
            if d.address.is_none() && !matches!(d.bus.as_str(), "system" | "session") {
                return Err(format!(
                    "dbus.bus {:?}: use \"system\" or \"session\", or set dbus.address",
                    d.bus
                ));
            }
        }
        for (name, device) in &self.devices {
            check_device_name(name)?;
            if let DeviceConfig::Pkcs11 { token, .. } = device {
                if !token.names_token() {
                    return Err(format!(
                        "devices.{name}.token {token} must name a token (token=, serial=, ...)"
                    ));
                }
            }
        }
        for name in self.unseal_order.iter().flatten() {
            if !self.devices.contains_key(name) {
                return Err(format!(
                    "unseal_order names {name:?}, which is not a configured device"
                ));
            }
        }
        self.limits.check()?;
        Ok(())
    }

    /// Device names in unattended-unseal order.
    pub fn unseal_order(&self) -> Vec<String> {
        match &self.unseal_order {
            Some(order) => order.clone(),
            None => self.devices.keys().cloned().collect(),
        }
    }

    /// The path of the database.
    pub fn database(&self) -> PathBuf {
        self.state_dir.join("keyward.db")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.check()?;
        Ok(c)
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            r#"
            state_dir = "/tmp/kw"
            policy = "/etc/keyward/policy.toml"
            unseal_order = ["tpm", "hsm"]
            [api]
            socket = "/tmp/kw/api.sock"
            mode = "0600"
            [devices.tpm]
            kind = "tpm2"
            tcti = "swtpm:host=127.0.0.1,port=2321"
            pcrs = [7, 11]
            [devices.hsm]
            kind = "pkcs11"
            module = "/usr/lib/softhsm/libsofthsm2.so"
            token = "pkcs11:token=keyward"
            pin_file = "/run/credentials/keywardd.service/hsm-pin"
            "#,
        )
        .unwrap();
        assert_eq!(c.api.mode_bits().unwrap(), 0o600);
        assert_eq!(c.unseal_order(), ["tpm", "hsm"]);
        assert_eq!(c.devices["tpm"].kind(), "tpm2");
        assert_eq!(c.devices["tpm"].tpm_config().unwrap().pcrs, [7, 11]);
    }

    #[test]
    fn mistakes_are_errors() {
        assert!(parse("state_dri = \"/x\"")
            .unwrap_err()
            .contains("unknown field"));
        assert!(parse("[devices.tpm]\nkind = \"tpm2\"\ntcti = \"swtpm:path=/x\"").is_err());
        assert!(parse("[devices.tpm]\nkind = \"tpm2\"\npin = \"1234\"").is_err());
        assert!(parse(
            "[devices.h]\nkind = \"pkcs11\"\nmodule = \"/m.so\"\ntoken = \"pkcs11:object=x\""
        )
        .unwrap_err()
        .contains("must name a token"));
        assert!(parse("unseal_order = [\"nope\"]")
            .unwrap_err()
            .contains("not a configured device"));
        assert!(parse("[api]\nmode = \"rw\"").is_err());
        assert!(parse("[devices.\"Bad Name\"]\nkind = \"tpm2\"").is_err());
    }

    #[test]
    fn limits_default_and_bounds() {
        let l = parse("").unwrap().limits;
        assert_eq!(
            (l.max_connections, l.max_connections_per_uid, l.root_reserve),
            (256, 64, 16)
        );
        assert!(l.max_connections_per_uid < l.max_connections - l.root_reserve);
        assert!(l.idle_timeout_secs <= 10, "idle connections hold slots");
        let l =
            parse("[limits]\nmax_connections = 8\nmax_connections_per_uid = 2\nroot_reserve = 1")
                .unwrap()
                .limits;
        assert_eq!(
            (l.max_connections, l.max_connections_per_uid, l.root_reserve),
            (8, 2, 1)
        );
        assert!(parse("[limits]\nmax_connections = 8")
            .unwrap_err()
            .contains("root_reserve"));
        assert!(parse("[limits]\nmax_connections_per_uid = 0").is_err());
        assert!(parse("[limits]\nidle_timeout_secs = 0").is_err());
        assert!(parse("[limits]\nmax_conections = 8").is_err());
    }
}

/// `[audit]`: how the audit log is kept.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// `audit.log` rolls over to `audit.log.N` at this size (bytes; at least 4096).
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
    /// A configured `tpm2` device whose NV counter the audit anchors are bound to, so that a
    /// log and anchor rolled back together are caught. Off unless set.
    #[serde(default)]
    pub tpm_counter: Option<String>,
    /// The counter's NV index (owner range; default 0x01004b57).
    #[serde(default = "default_counter_index")]
    pub tpm_counter_index: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            max_file_bytes: default_max_file_bytes(),
            tpm_counter: None,
            tpm_counter_index: default_counter_index(),
        }
    }
}

fn default_max_file_bytes() -> u64 {
    crate::audit::DEFAULT_MAX_FILE_BYTES
}

fn default_counter_index() -> u32 {
    0x0100_4b57
}

impl AuditConfig {
    /// The options the audit log is opened with.
    ///
    /// # Errors
    /// A size too small to hold a few records.
    pub fn options(&self) -> Result<crate::audit::AuditOptions, String> {
        if self.max_file_bytes < 4096 {
            return Err(format!(
                "audit.max_file_bytes = {} is below 4096",
                self.max_file_bytes
            ));
        }
        Ok(crate::audit::AuditOptions {
            max_file_bytes: self.max_file_bytes,
        })
    }
}
