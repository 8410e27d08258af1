//! `keywardd.toml`: where the state lives, which sockets to serve, which devices to use and in
//! which order to try them at start. The file is read once, here, into a [`Config`] whose every
//! field is already checked and typed (modes as [`SocketMode`], times as [`Duration`], devices
//! as the [`DeviceSpec`]s the device actors open): no subsystem reads raw TOML or re-validates a
//! setting. Unknown keys are errors, so a typo never silently turns a protection off, and every
//! error names the setting it is about. PINs are never in this file: only the path of a file
//! that holds one (a systemd credential, typically).
//!
//! This module must not open, bind or start anything: it only turns text into settings.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use hsm_shim::tpm::{Tcti, TpmConfig};
use hsm_shim::uri::Pkcs11Uri;
use keyward_proto::api;
use serde::Deserialize;

use crate::audit::AuditOptions;
use crate::device::{ActorOptions, DeviceSpec, Pkcs11Spec};
use crate::transport::credentials::CredentialLimits;
use crate::transport::dbus::{Bus, DbusLimits};
use crate::transport::ssh_agent::SshAgentLimits;
use crate::transport::transit::TransitLimits;
use crate::transport::varlink::VarlinkLimits;

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
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: Invalid },
}

/// A setting that parsed as TOML but can't be used: which key, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{key} {problem}")]
pub struct Invalid {
    /// The setting, as written in the file (`api.mode`, `devices.hsm.token`).
    pub key: String,
    /// What is wrong with its value.
    pub problem: String,
}

impl Invalid {
    fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// Permission bits of a socket: octal, nothing beyond `0777`. The one parser of socket modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketMode(u32);

impl SocketMode {
    /// The mode bits, for `chmod`.
    pub fn bits(self) -> u32 {
        self.0
    }
}

/// Why a text is not a socket mode.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModeError {
    /// Not an octal number.
    #[error("{0:?} is not an octal mode like \"0660\"")]
    NotOctal(String),
    /// Bits a socket's permissions don't have.
    #[error("{0:?} has bits beyond 0777")]
    TooWide(String),
}

impl FromStr for SocketMode {
    type Err = ModeError;

    /// `"0660"`, `"660"` or `"0o660"`.
    fn from_str(text: &str) -> Result<Self, ModeError> {
        let bits = u32::from_str_radix(text.trim_start_matches("0o"), 8)
            .map_err(|_| ModeError::NotOctal(text.to_owned()))?;
        if bits > 0o777 {
            return Err(ModeError::TooWide(text.to_owned()));
        }
        Ok(Self(bits))
    }
}

impl fmt::Display for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

/// A socket to bind when systemd does not pass one in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketSettings {
    /// Its path (ignored under socket activation).
    pub path: PathBuf,
    /// Its permissions.
    pub mode: SocketMode,
}

/// The credential socket: where, and its bounds.
#[derive(Clone, Debug)]
pub struct CredentialSettings {
    /// The socket.
    pub socket: SocketSettings,
    /// How long a request may wait for the unseal, how many are served at once, how long a
    /// write may take.
    pub limits: CredentialLimits,
}

impl CredentialSettings {
    /// The limits of a `[credentials]` table that sets none: also those of a credential socket
    /// systemd passes in when the file has no such table.
    pub fn default_limits() -> CredentialLimits {
        CredentialLimits {
            wait_unsealed: Duration::from_secs(default_credentials_wait()),
            max_connections: default_credentials_connections(),
            write_timeout: Duration::from_secs(default_credentials_write_timeout()),
        }
    }
}

/// The ssh-agent socket: where, and its bounds.
#[derive(Clone, Debug)]
pub struct SshAgentSettings {
    /// The socket (`SSH_AUTH_SOCK`).
    pub socket: SocketSettings,
    /// Connections at once, idle time.
    pub limits: SshAgentLimits,
}

impl SshAgentSettings {
    /// The limits of an `[ssh_agent]` table that sets none: also those of an ssh-agent socket
    /// systemd passes in when the file has no such table.
    pub fn default_limits() -> SshAgentLimits {
        SshAgentLimits {
            max_connections: default_ssh_agent_connections(),
            idle_timeout: Duration::from_secs(default_ssh_agent_idle()),
        }
    }
}

/// The D-Bus service: which bus, and its bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbusSettings {
    /// The bus it joins.
    pub bus: Bus,
    /// How many calls it serves at once, how long the stop waits for them.
    pub limits: DbusLimits,
}

/// The OpenBao-compatible transit socket: where, and its bounds.
#[derive(Clone, Debug)]
pub struct TransitSettings {
    /// The socket.
    pub socket: SocketSettings,
    /// Its mount path and bounds.
    pub limits: TransitLimits,
}

impl TransitSettings {
    /// The mount and bounds of a `[transit]` table that sets none: also those of a transit
    /// socket systemd passes in when the file has no such table.
    pub fn default_limits() -> TransitLimits {
        TransitLimits {
            mount: default_transit_mount(),
            max_body: default_transit_max_body(),
            max_connections: default_transit_connections(),
            header_timeout: Duration::from_secs(default_transit_header_timeout()),
        }
    }
}

/// The audit log's NV counter: a configured `tpm2` device and the index on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpmCounter {
    /// The device's configured name (checked to be a `tpm2` device).
    pub device: String,
    /// The NV index.
    pub index: u32,
}

/// What the upstream sync does when the upstream deleted or destroyed a secret it brought.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRemoteDelete {
    /// Keep the last good value here, note it in the status and warn in the audit log.
    Keep,
    /// Delete the local secret too.
    Remove,
}

/// One `[[upstream.map]]`: a KV v2 path (a prefix when it ends with `/`) and the local secret
/// (a local prefix for a prefix) it fills.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamMapping {
    /// The KV v2 path under the mount, `/`-separated; a prefix ends with `/`.
    pub remote: String,
    /// The local secret name; for a prefix, what the remote path's rest is appended to.
    pub secret: String,
    /// The KV field whose string value is the secret; without one, the whole KV data object as
    /// JSON.
    pub field: Option<String>,
}

impl UpstreamMapping {
    /// The mapping names every secret under a path.
    pub fn is_prefix(&self) -> bool {
        self.remote.ends_with('/')
    }
}

/// One OpenBao node of `upstream.address`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamServer {
    /// `https://host[:port]`, as given.
    pub address: String,
    /// The host (a DNS name or an IP address: what the server's certificate must name).
    pub host: String,
    pub port: u16,
}

impl UpstreamServer {
    /// Check `address`, an `https://host[:port]` URL.
    fn parse(address: String) -> Result<Self, Invalid> {
        let uri: hyper::Uri = address.parse().map_err(|e| {
            Invalid::new("upstream.address", format!("{address:?} is not a URL: {e}"))
        })?;
        if uri.scheme_str() != Some("https") {
            return Err(Invalid::new(
                "upstream.address",
                "must be an https:// URL: the machine proves who it is by TLS",
            ));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(Invalid::new(
                "upstream.address",
                "is the server's https://host:port, without a path",
            ));
        }
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .filter(|h| !h.is_empty())
            .ok_or_else(|| Invalid::new("upstream.address", "names no host"))?;
        Ok(Self {
            port: uri.port_u16().unwrap_or(443),
            host,
            address,
        })
    }
}

/// The OpenBao upstream sync: where, as whom (a device key and its certificate), what, how often.
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    /// The cluster's nodes, in the order given: a sync uses the one that last answered and
    /// moves on to the next when it can't be reached or fails mid-sync.
    pub servers: Vec<UpstreamServer>,
    /// The CA certificates (PEM) the server's certificate must chain to.
    pub ca_file: PathBuf,
    /// The machine's certificate (PEM, public), issued for the device key `key`; a chain may
    /// follow it.
    pub cert_file: PathBuf,
    /// The vault's device key (`keyward key create`) that proves the machine's identity.
    pub key: api::KeyName,
    /// The `auth/cert` role to log in as.
    pub role: String,
    /// The KV v2 mount.
    pub mount: String,
    pub mappings: Vec<UpstreamMapping>,
    pub interval: Duration,
    /// Up to this much is added to each interval, at random, so a fleet does not sync in step.
    pub jitter: Duration,
    /// How long the start waits for a first sync before `READY=1`.
    pub initial_sync_timeout: Duration,
    /// Bound on connecting, the TLS handshake and each request.
    pub request_timeout: Duration,
    pub on_remote_delete: OnRemoteDelete,
}

/// The whole configuration, checked.
#[derive(Debug)]
pub struct Config {
    /// Where the database and the audit log live (mode 0700).
    pub state_dir: PathBuf,
    /// The Varlink API socket.
    pub api: SocketSettings,
    /// systemd's `LoadCredential=` socket, when configured.
    pub credentials: Option<CredentialSettings>,
    /// The D-Bus service, when configured.
    pub dbus: Option<DbusSettings>,
    /// The ssh-agent socket, when configured.
    pub ssh_agent: Option<SshAgentSettings>,
    /// The OpenBao-compatible transit socket, when configured.
    pub transit: Option<TransitSettings>,
    /// The OpenBao upstream sync, when configured.
    pub upstream: Option<UpstreamSettings>,
    /// The policy file. Without one, everything but `Status` is denied.
    pub policy: Option<PathBuf>,
    /// Device names to try, in order, for the unattended unseal at start (every one is a
    /// configured device).
    pub unseal_order: Vec<String>,
    /// The devices, by the name keyslots and keys refer to.
    pub devices: BTreeMap<String, DeviceSpec>,
    /// SoftHSM's config file, when a device names one (all that name one name the same).
    pub softhsm_conf: Option<PathBuf>,
    /// How device actors queue and wait.
    pub actor: ActorOptions,
    /// The Varlink transport's bounds.
    pub varlink: VarlinkLimits,
    /// How often every device is pinged for `STATUS=`.
    pub device_watch: Duration,
    /// How long new recovery shares wait to be confirmed.
    pub confirm_within: Duration,
    /// How the audit log is kept.
    pub audit: AuditOptions,
    /// The audit anchors' NV counter, when configured.
    pub tpm_counter: Option<TpmCounter>,
}

impl Config {
    /// Load and check a config file.
    ///
    /// # Errors
    /// The file can't be read, isn't valid TOML, has unknown keys, or a setting is unusable.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ParseError::Toml(source) => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            ParseError::Invalid(source) => ConfigError::Invalid {
                path: path.to_owned(),
                source,
            },
        })
    }

    fn parse(text: &str) -> Result<Self, ParseError> {
        let file: File = toml::from_str(text).map_err(ParseError::Toml)?;
        file.check().map_err(ParseError::Invalid)
    }

    /// The path of the database.
    pub fn database(&self) -> PathBuf {
        self.state_dir.join("keyward.db")
    }
}

enum ParseError {
    Toml(toml::de::Error),
    Invalid(Invalid),
}

/// A `mode` key, checked.
fn mode(key: &str, text: &str) -> Result<SocketMode, Invalid> {
    text.parse()
        .map_err(|e: ModeError| Invalid::new(key, e.to_string()))
}

/// A count that must be at least 1.
fn positive(key: &str, n: u64) -> Result<u64, Invalid> {
    if n == 0 {
        return Err(Invalid::new(key, "must be at least 1"));
    }
    Ok(n)
}

/// A count of things held at once, at least 1 (and no more than a semaphore can count).
fn count(key: &str, n: usize) -> Result<usize, Invalid> {
    if n == 0 {
        return Err(Invalid::new(key, "must be at least 1"));
    }
    let most = tokio::sync::Semaphore::MAX_PERMITS;
    if n > most {
        return Err(Invalid::new(key, format!("must be at most {most}")));
    }
    Ok(n)
}

/// Device names must be short identifiers: they appear in keyslots, key records and logs.
fn check_device_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(
            format!("devices.{name:?}"),
            "is not a device name: use 1 to 32 of a-z, 0-9, '-' and '_'",
        ))
    }
}

impl File {
    fn check(self) -> Result<Config, Invalid> {
        let api = SocketSettings {
            mode: mode("api.mode", &self.api.mode)?,
            path: self.api.socket,
        };
        let credentials = match self.credentials {
            Some(c) => Some(CredentialSettings {
                socket: SocketSettings {
                    mode: mode("credentials.mode", &c.mode)?,
                    path: c.socket,
                },
                limits: CredentialLimits {
                    wait_unsealed: Duration::from_secs(c.wait_unsealed_secs),
                    max_connections: count("credentials.max_connections", c.max_connections)?,
                    write_timeout: Duration::from_secs(positive(
                        "credentials.write_timeout_secs",
                        c.write_timeout_secs,
                    )?),
                },
            }),
            None => None,
        };
        let ssh_agent = match self.ssh_agent {
            Some(a) => Some(SshAgentSettings {
                socket: SocketSettings {
                    mode: mode("ssh_agent.mode", &a.mode)?,
                    path: a.socket,
                },
                limits: SshAgentLimits {
                    max_connections: count("ssh_agent.max_connections", a.max_connections)?,
                    idle_timeout: Duration::from_secs(positive(
                        "ssh_agent.idle_timeout_secs",
                        a.idle_timeout_secs,
                    )?),
                },
            }),
            None => None,
        };
        let transit = match self.transit {
            Some(t) => Some(TransitSettings {
                socket: SocketSettings {
                    mode: mode("transit.mode", &t.mode)?,
                    path: t.socket,
                },
                limits: TransitLimits {
                    mount: check_mount("transit.mount", &t.mount)?,
                    max_body: count("transit.max_body_bytes", t.max_body_bytes)?,
                    max_connections: count("transit.max_connections", t.max_connections)?,
                    header_timeout: Duration::from_secs(positive(
                        "transit.header_timeout_secs",
                        t.header_timeout_secs,
                    )?),
                },
            }),
            None => None,
        };
        let upstream = self.upstream.map(FileUpstream::check).transpose()?;
        let dbus = match self.dbus {
            None => None,
            Some(d) => Some(DbusSettings {
                bus: match (d.address, d.bus.as_str()) {
                    (Some(address), _) => Bus::Address(address),
                    (None, "system") => Bus::System,
                    (None, "session") => Bus::Session,
                    (None, bus) => {
                        return Err(Invalid::new(
                            "dbus.bus",
                            format!("{bus:?}: use \"system\" or \"session\", or set dbus.address"),
                        ))
                    }
                },
                limits: DbusLimits {
                    max_calls_in_flight: count("dbus.max_calls_in_flight", d.max_calls_in_flight)?,
                    drain_timeout: Duration::from_secs(positive(
                        "dbus.drain_timeout_secs",
                        d.drain_timeout_secs,
                    )?),
                },
            }),
        };
        let mut devices = BTreeMap::new();
        let mut softhsm_conf: Option<PathBuf> = None;
        for (name, device) in self.devices {
            check_device_name(&name)?;
            let spec = match device {
                FileDevice::Tpm2 {
                    tcti,
                    pcrs,
                    pcr_signature,
                } => DeviceSpec::Tpm2(TpmConfig {
                    tcti,
                    pcrs,
                    pcr_signature,
                }),
                FileDevice::Pkcs11 {
                    module,
                    token,
                    pin_file,
                    softhsm_conf: conf,
                    seal_key_label,
                } => {
                    if !token.names_token() {
                        return Err(Invalid::new(
                            format!("devices.{name}.token"),
                            format!("{token} must name a token (token=, serial=, ...)"),
                        ));
                    }
                    if let Some(path) = conf {
                        if softhsm_conf.as_ref().is_some_and(|c| *c != path) {
                            return Err(Invalid::new(
                                format!("devices.{name}.softhsm_conf"),
                                "differs from another device's: SoftHSM reads one config per process",
                            ));
                        }
                        softhsm_conf = Some(path);
                    }
                    DeviceSpec::Pkcs11(Box::new(Pkcs11Spec {
                        module,
                        token: *token,
                        pin_file,
                        seal_key_label,
                    }))
                }
            };
            devices.insert(name, spec);
        }
        let unseal_order = match self.unseal_order {
            Some(order) => {
                if let Some(name) = order.iter().find(|n| !devices.contains_key(*n)) {
                    return Err(Invalid::new(
                        "unseal_order",
                        format!("names {name:?}, which is not a configured device"),
                    ));
                }
                order
            }
            None => devices.keys().cloned().collect(),
        };
        let tpm_counter = match self.audit.tpm_counter {
            Some(device) => {
                if !matches!(devices.get(&device), Some(DeviceSpec::Tpm2(_))) {
                    return Err(Invalid::new(
                        "audit.tpm_counter",
                        format!("{device:?} is not a configured tpm2 device"),
                    ));
                }
                Some(TpmCounter {
                    device,
                    index: self.audit.tpm_counter_index,
                })
            }
            None => None,
        };
        if self.audit.max_file_bytes < 4096 {
            return Err(Invalid::new(
                "audit.max_file_bytes",
                format!("= {} is below 4096", self.audit.max_file_bytes),
            ));
        }
        let l = &self.limits;
        let max_connections = count("limits.max_connections", l.max_connections)?;
        if l.root_reserve >= max_connections {
            return Err(Invalid::new(
                "limits.root_reserve",
                format!(
                    "({}) must be below limits.max_connections ({max_connections}): \
                     other users need a slot too",
                    l.root_reserve
                ),
            ));
        }
        Ok(Config {
            state_dir: self.state_dir,
            api,
            credentials,
            dbus,
            ssh_agent,
            transit,
            upstream,
            policy: self.policy,
            unseal_order,
            devices,
            softhsm_conf,
            actor: ActorOptions {
                queue: count("limits.device_queue", l.device_queue)?,
                timeout: Duration::from_secs(l.device_timeout_secs),
                ..ActorOptions::default()
            },
            varlink: VarlinkLimits {
                max_frame: api::MAX_FRAME_LEN,
                max_connections,
                max_connections_per_uid: count(
                    "limits.max_connections_per_uid",
                    l.max_connections_per_uid,
                )?,
                root_reserve: l.root_reserve,
                idle_timeout: Duration::from_secs(positive(
                    "limits.idle_timeout_secs",
                    l.idle_timeout_secs,
                )?),
            },
            device_watch: Duration::from_secs(positive(
                "limits.device_watch_secs",
                l.device_watch_secs,
            )?),
            confirm_within: Duration::from_secs(self.recovery.confirm_within_secs),
            audit: AuditOptions {
                max_file_bytes: self.audit.max_file_bytes,
            },
            tpm_counter,
        })
    }
}

// The file as written. Private: only `File::check` reads it, once.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// Where the database lives (mode 0700).
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default)]
    api: FileApi,
    /// Off unless configured.
    #[serde(default)]
    credentials: Option<FileCredentials>,
    /// Off unless configured.
    #[serde(default)]
    dbus: Option<FileDbus>,
    /// Off unless configured.
    #[serde(default)]
    ssh_agent: Option<FileSshAgent>,
    /// Off unless configured.
    #[serde(default)]
    transit: Option<FileTransit>,
    /// Off unless configured.
    #[serde(default)]
    upstream: Option<FileUpstream>,
    #[serde(default)]
    policy: Option<PathBuf>,
    /// Default: every configured device, in name order. Recovery slots are never tried
    /// unattended.
    #[serde(default)]
    unseal_order: Option<Vec<String>>,
    #[serde(default)]
    devices: BTreeMap<String, FileDevice>,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    recovery: FileRecovery,
    #[serde(default)]
    audit: FileAudit,
}

/// New shares (from init, enroll or rekey) that are not confirmed within `confirm_within_secs`
/// lapse: an unconfirmed keyslot is dropped, a pending rekey is forgotten.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRecovery {
    #[serde(default = "default_confirm_within")]
    confirm_within_secs: u64,
}

impl Default for FileRecovery {
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileApi {
    #[serde(default = "default_api_socket")]
    socket: PathBuf,
    /// Octal, as a string ("0660").
    #[serde(default = "default_mode")]
    mode: String,
}

impl Default for FileApi {
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

/// The credential socket that systemd connects to for `LoadCredential=ID:PATH`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCredentials {
    #[serde(default = "default_credentials_socket")]
    socket: PathBuf,
    /// "0600": only systemd, which runs as root, connects.
    #[serde(default = "default_credentials_mode")]
    mode: String,
    #[serde(default = "default_credentials_wait")]
    wait_unsealed_secs: u64,
    /// A boot starts hundreds of units together; more wait in the backlog.
    #[serde(default = "default_credentials_connections")]
    max_connections: usize,
    #[serde(default = "default_credentials_write_timeout")]
    write_timeout_secs: u64,
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

fn default_credentials_connections() -> usize {
    1024
}

fn default_credentials_write_timeout() -> u64 {
    10
}

/// The ssh-agent socket. Anyone who can connect sees only the keys the policy lets them sign
/// with; the mode decides who may connect at all.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSshAgent {
    #[serde(default = "default_ssh_agent_socket")]
    socket: PathBuf,
    /// Octal, as a string ("0660").
    #[serde(default = "default_mode")]
    mode: String,
    #[serde(default = "default_ssh_agent_connections")]
    max_connections: usize,
    /// ssh keeps its connection while it authenticates, which may wait on a person.
    #[serde(default = "default_ssh_agent_idle")]
    idle_timeout_secs: u64,
}

fn default_ssh_agent_socket() -> PathBuf {
    PathBuf::from("/run/keyward/ssh-agent.sock")
}

fn default_ssh_agent_connections() -> usize {
    128
}

fn default_ssh_agent_idle() -> u64 {
    60
}

/// The OpenBao-compatible transit socket (`seal "transit" { address = "unix://…" }`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTransit {
    #[serde(default = "default_transit_socket")]
    socket: PathBuf,
    /// "0660": the OpenBao service's group connects.
    #[serde(default = "default_mode")]
    mode: String,
    /// OpenBao's `mount_path`.
    #[serde(default = "default_transit_mount")]
    mount: String,
    #[serde(default = "default_transit_max_body")]
    max_body_bytes: usize,
    #[serde(default = "default_transit_connections")]
    max_connections: usize,
    #[serde(default = "default_transit_header_timeout")]
    header_timeout_secs: u64,
}

fn default_transit_socket() -> PathBuf {
    PathBuf::from("/run/keyward/transit.sock")
}

fn default_transit_mount() -> String {
    "transit".into()
}

fn default_transit_max_body() -> usize {
    api::MAX_FRAME_LEN
}

fn default_transit_connections() -> usize {
    64
}

fn default_transit_header_timeout() -> u64 {
    30
}

/// A mount path: `/`-separated segments of `A-Z a-z 0-9 . _ -` (a leading or trailing `/`, as
/// OpenBao's `mount_path = "transit/"`, is dropped).
fn check_mount(key: &str, mount: &str) -> Result<String, Invalid> {
    let trimmed = mount.trim_matches('/');
    let ok = !trimmed.is_empty()
        && trimmed.split('/').all(|s| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(trimmed.to_owned())
    } else {
        Err(Invalid::new(
            key,
            format!("{mount:?} is not a mount path like \"transit\""),
        ))
    }
}

/// The OpenBao upstream sync (`[upstream]` and its `[[upstream.map]]`s).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    address: OneOrMany,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key: String,
    role: String,
    #[serde(default = "default_upstream_mount")]
    mount: String,
    #[serde(default)]
    map: Vec<FileUpstreamMap>,
    #[serde(default = "default_upstream_interval")]
    interval_secs: u64,
    #[serde(default = "default_upstream_jitter")]
    jitter_secs: u64,
    #[serde(default = "default_upstream_initial_sync")]
    initial_sync_timeout_secs: u64,
    #[serde(default = "default_upstream_request_timeout")]
    request_timeout_secs: u64,
    #[serde(default = "default_on_remote_delete")]
    on_remote_delete: OnRemoteDelete,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstreamMap {
    remote: String,
    secret: String,
    #[serde(default)]
    field: Option<String>,
}

fn default_upstream_mount() -> String {
    "secret".into()
}

fn default_upstream_interval() -> u64 {
    300
}

fn default_upstream_jitter() -> u64 {
    30
}

fn default_upstream_initial_sync() -> u64 {
    10
}

fn default_upstream_request_timeout() -> u64 {
    10
}

fn default_on_remote_delete() -> OnRemoteDelete {
    OnRemoteDelete::Keep
}

/// `upstream.address`: one node's URL, or a list of the cluster's nodes.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A KV v2 path: `/`-separated segments of what a secret name allows, a prefix with a
/// trailing `/`; nothing that would change the URL it goes into.
fn check_kv_path(key: &str, path: &str) -> Result<(), Invalid> {
    let ok = !path.is_empty()
        && !path.starts_with('/')
        && path.trim_end_matches('/').split('/').all(|s| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-@+=".contains(&b))
        })
        && !path.ends_with("//");
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(
            key,
            format!("{path:?} is not a KV path like \"app/db\" (or a prefix like \"app/\")"),
        ))
    }
}

impl FileUpstream {
    fn check(self) -> Result<UpstreamSettings, Invalid> {
        let addresses = match self.address {
            OneOrMany::One(a) => vec![a],
            OneOrMany::Many(list) => list,
        };
        if addresses.is_empty() {
            return Err(Invalid::new("upstream.address", "names no server"));
        }
        let servers = addresses
            .into_iter()
            .map(UpstreamServer::parse)
            .collect::<Result<Vec<_>, _>>()?;
        let key = api::KeyName::try_from(self.key.clone())
            .map_err(|e| Invalid::new("upstream.key", e.to_string()))?;
        if self.role.is_empty()
            || !self
                .role
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(Invalid::new(
                "upstream.role",
                "is an auth/cert role name: A-Z a-z 0-9 . _ -",
            ));
        }
        let mut mappings = Vec::with_capacity(self.map.len());
        for (i, m) in self.map.into_iter().enumerate() {
            let at = |what: &str| format!("upstream.map[{i}].{what}");
            check_kv_path(&at("remote"), &m.remote)?;
            let prefix = m.remote.ends_with('/');
            if prefix != m.secret.ends_with('/') {
                return Err(Invalid::new(
                    at("secret"),
                    "a prefix maps to a prefix: both end with '/', or neither",
                ));
            }
            let name = if prefix {
                // Any name under it must be a name: check the prefix with one segment added.
                format!("{}x", m.secret)
            } else {
                m.secret.clone()
            };
            api::SecretName::try_from(name)
                .map_err(|e| Invalid::new(at("secret"), e.to_string()))?;
            if m.field.as_deref().is_some_and(str::is_empty) {
                return Err(Invalid::new(at("field"), "is empty"));
            }
            mappings.push(UpstreamMapping {
                remote: m.remote,
                secret: m.secret,
                field: m.field,
            });
        }
        Ok(UpstreamSettings {
            servers,
            ca_file: self.ca_file,
            cert_file: self.cert_file,
            key,
            role: self.role,
            mount: check_mount("upstream.mount", &self.mount)?,
            mappings,
            interval: Duration::from_secs(positive("upstream.interval_secs", self.interval_secs)?),
            jitter: Duration::from_secs(self.jitter_secs),
            initial_sync_timeout: Duration::from_secs(self.initial_sync_timeout_secs),
            request_timeout: Duration::from_secs(positive(
                "upstream.request_timeout_secs",
                self.request_timeout_secs,
            )?),
            on_remote_delete: self.on_remote_delete,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDbus {
    /// `system` (default) or `session`; ignored when `address` is set.
    #[serde(default = "default_bus")]
    bus: String,
    /// An explicit bus address (`unix:path=…`), e.g. a private bus in tests.
    #[serde(default)]
    address: Option<String>,
    /// Calls served at once, all callers together; beyond it: `Busy`.
    #[serde(default = "default_dbus_calls")]
    max_calls_in_flight: usize,
    /// How long the stop waits for calls in flight to be answered.
    #[serde(default = "default_dbus_drain")]
    drain_timeout_secs: u64,
}

fn default_bus() -> String {
    "system".into()
}

fn default_dbus_calls() -> usize {
    256
}

fn default_dbus_drain() -> u64 {
    30
}

/// Bounds on client-controlled resources.
///
/// Connections are counted per uid (from the kernel) so that one user can't take every slot:
/// a connection beyond a bound is answered at once with the error `Busy` and closed, never
/// left waiting. The last `root_reserve` slots are root's alone, so an administrator gets in
/// even when other users fill the rest.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_max_connections_per_uid")]
    max_connections_per_uid: usize,
    #[serde(default = "default_root_reserve")]
    root_reserve: usize,
    /// Short, because an idle connection holds a slot. Clients connect again when they need to
    /// (the Rust client does so by itself).
    #[serde(default = "default_idle_timeout")]
    idle_timeout_secs: u64,
    #[serde(default = "default_device_timeout")]
    device_timeout_secs: u64,
    #[serde(default = "default_device_queue")]
    device_queue: usize,
    /// So `STATUS=` says a device went away (or came back) without waiting for a request to
    /// find out.
    #[serde(default = "default_device_watch")]
    device_watch_secs: u64,
}

impl Default for FileLimits {
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

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
enum FileDevice {
    Tpm2 {
        /// `device:/dev/tpmrm0` (default) or `swtpm:host=…,port=…`.
        #[serde(default)]
        tcti: Tcti,
        /// Default PCRs of the sha256 bank for new tpm2 keyslots.
        #[serde(default = "default_pcrs")]
        pcrs: Vec<u8>,
        /// The signature file of signed PCR policies (`systemd-measure sign` JSON) [default:
        /// systemd's, `/run/systemd/tpm2-pcr-signature.json` then
        /// `/usr/lib/systemd/tpm2-pcr-signature.json`].
        #[serde(default)]
        pcr_signature: Option<PathBuf>,
    },
    Pkcs11 {
        module: PathBuf,
        /// A PKCS#11 URI that names the token (`pkcs11:token=…`).
        token: Box<Pkcs11Uri>,
        /// Never the PIN itself.
        #[serde(default)]
        pin_file: Option<PathBuf>,
        /// Exported as `SOFTHSM2_CONF` at start: Keyward never lets SoftHSM fall back to
        /// `/etc/softhsm/softhsm2.conf`.
        #[serde(default)]
        softhsm_conf: Option<PathBuf>,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAudit {
    /// `audit.log` rolls over to `audit.log.N` at this size (bytes; at least 4096).
    #[serde(default = "default_max_file_bytes")]
    max_file_bytes: u64,
    /// A configured `tpm2` device whose NV counter the audit anchors are bound to, so that a
    /// log and anchor rolled back together are caught. Off unless set.
    #[serde(default)]
    tpm_counter: Option<String>,
    /// Owner range.
    #[serde(default = "default_counter_index")]
    tpm_counter_index: u32,
}

impl Default for FileAudit {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text).map_err(|e| match e {
            ParseError::Toml(e) => e.to_string(),
            ParseError::Invalid(e) => e.to_string(),
        })
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
            [credentials]
            max_connections = 8
            write_timeout_secs = 3
            [dbus]
            max_calls_in_flight = 4
            drain_timeout_secs = 5
            [devices.tpm]
            kind = "tpm2"
            tcti = "swtpm:host=127.0.0.1,port=2321"
            pcrs = [7, 11]
            [devices.hsm]
            kind = "pkcs11"
            module = "/usr/lib/softhsm/libsofthsm2.so"
            token = "pkcs11:token=keyward"
            pin_file = "/run/credentials/keywardd.service/hsm-pin"
            softhsm_conf = "/etc/keyward/softhsm2.conf"
            [audit]
            tpm_counter = "tpm"
            "#,
        )
        .unwrap();
        assert_eq!(c.api.mode.bits(), 0o600);
        assert_eq!(c.unseal_order, ["tpm", "hsm"]);
        let DeviceSpec::Tpm2(tpm) = &c.devices["tpm"] else {
            panic!("{:?}", c.devices["tpm"]);
        };
        assert_eq!(tpm.pcrs, [7, 11]);
        assert_eq!(c.devices["hsm"].kind(), hsm_shim::DeviceKind::Pkcs11);
        assert_eq!(
            c.softhsm_conf.as_deref(),
            Some(Path::new("/etc/keyward/softhsm2.conf"))
        );
        let credentials = c.credentials.unwrap();
        assert_eq!(credentials.socket.mode.bits(), 0o600);
        assert_eq!(credentials.limits.max_connections, 8);
        assert_eq!(credentials.limits.write_timeout, Duration::from_secs(3));
        assert_eq!(credentials.limits.wait_unsealed, Duration::from_secs(60));
        let dbus = c.dbus.unwrap().limits;
        assert_eq!(dbus.max_calls_in_flight, 4);
        assert_eq!(dbus.drain_timeout, Duration::from_secs(5));
        assert_eq!(
            c.tpm_counter,
            Some(TpmCounter {
                device: "tpm".into(),
                index: 0x0100_4b57
            })
        );
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = parse("[credentials]\n[dbus]\n[ssh_agent]").unwrap();
        assert_eq!(c.api.mode.bits(), 0o660);
        let agent = c.ssh_agent.unwrap();
        assert_eq!(agent.socket.path, Path::new("/run/keyward/ssh-agent.sock"));
        assert_eq!(agent.socket.mode.bits(), 0o660);
        assert_eq!(agent.limits.max_connections, 128);
        assert_eq!(agent.limits.idle_timeout, Duration::from_secs(60));
        assert!(parse("").unwrap().ssh_agent.is_none());
        assert_eq!(c.api.path, Path::new("/run/keyward/api.sock"));
        let credentials = c.credentials.unwrap();
        assert_eq!(credentials.limits.max_connections, 1024);
        assert_eq!(credentials.limits.write_timeout, Duration::from_secs(10));
        let dbus = c.dbus.unwrap();
        assert_eq!(dbus.bus, Bus::System);
        assert_eq!(dbus.limits.max_calls_in_flight, 256);
        assert_eq!(dbus.limits.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.confirm_within, Duration::from_secs(3600));
        assert_eq!(c.device_watch, Duration::from_secs(15));
        assert_eq!(c.actor.timeout, Duration::from_secs(30));
        assert!(c.unseal_order.is_empty() && c.devices.is_empty());
        assert_eq!(
            parse("[dbus]\nbus = \"bogus\"\naddress = \"unix:path=/x\"")
                .unwrap()
                .dbus
                .map(|d| d.bus),
            Some(Bus::Address("unix:path=/x".into()))
        );
    }

    /// The shipped example is a valid config, and the defaults it documents are the code's.
    #[test]
    fn the_shipped_example_loads_with_the_documented_defaults() {
        let c = parse(include_str!("../../systemd/keywardd.toml.example")).unwrap();
        let credentials = c.credentials.unwrap();
        let defaults = CredentialSettings::default_limits();
        assert_eq!(credentials.socket.mode.bits(), 0o600);
        assert_eq!(credentials.limits.max_connections, defaults.max_connections);
        assert_eq!(credentials.limits.write_timeout, defaults.write_timeout);
        assert_eq!(credentials.limits.wait_unsealed, defaults.wait_unsealed);
        let dbus = c.dbus.unwrap();
        assert_eq!(dbus.bus, Bus::System);
        assert_eq!(dbus.limits, parse("[dbus]").unwrap().dbus.unwrap().limits);
    }

    #[test]
    fn socket_modes_are_parsed_once_and_named_in_errors() {
        assert_eq!("0660".parse::<SocketMode>().unwrap().bits(), 0o660);
        assert_eq!("0o600".parse::<SocketMode>().unwrap().bits(), 0o600);
        assert_eq!("0o600".parse::<SocketMode>().unwrap().to_string(), "0600");
        assert_eq!(
            "0o8".parse::<SocketMode>(),
            Err(ModeError::NotOctal("0o8".into()))
        );
        assert_eq!(
            "1777".parse::<SocketMode>(),
            Err(ModeError::TooWide("1777".into()))
        );
        let e = parse("[api]\nmode = \"0o8\"").unwrap_err();
        assert_eq!(e, "api.mode \"0o8\" is not an octal mode like \"0660\"");
        let e = parse("[credentials]\nmode = \"rw\"").unwrap_err();
        assert!(e.starts_with("credentials.mode \"rw\""), "{e}");
        let e = parse("[ssh_agent]\nmode = \"rw\"").unwrap_err();
        assert!(e.starts_with("ssh_agent.mode \"rw\""), "{e}");
        let e = parse("[credentials]\nmode = \"4755\"").unwrap_err();
        assert!(
            e.contains("credentials.mode") && e.contains("beyond 0777"),
            "{e}"
        );
    }

    #[test]
    fn zero_limits_are_errors_that_name_the_key() {
        for (table, key) in [
            ("limits", "max_connections"),
            ("limits", "max_connections_per_uid"),
            ("limits", "device_queue"),
            ("limits", "idle_timeout_secs"),
            ("limits", "device_watch_secs"),
            ("credentials", "max_connections"),
            ("credentials", "write_timeout_secs"),
            ("ssh_agent", "max_connections"),
            ("ssh_agent", "idle_timeout_secs"),
            ("dbus", "max_calls_in_flight"),
            ("dbus", "drain_timeout_secs"),
        ] {
            let e = parse(&format!("[{table}]\n{key} = 0")).unwrap_err();
            assert_eq!(e, format!("{table}.{key} must be at least 1"));
        }
        let too_many = tokio::sync::Semaphore::MAX_PERMITS + 1;
        let e = parse(&format!("[dbus]\nmax_calls_in_flight = {too_many}")).unwrap_err();
        assert!(
            e.starts_with("dbus.max_calls_in_flight must be at most"),
            "{e}"
        );
        assert!(parse("[limits]\nmax_connections = 8")
            .unwrap_err()
            .starts_with("limits.root_reserve (16) must be below"));
        assert!(parse("[audit]\nmax_file_bytes = 100")
            .unwrap_err()
            .starts_with("audit.max_file_bytes"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        for text in [
            "state_dri = \"/x\"",
            "[api]\nmod = \"0600\"",
            "[credentials]\nmax_conections = 8",
            "[dbus]\nmax_call_in_flight = 8",
            "[limits]\nmax_conections = 8",
            "[devices.tpm]\nkind = \"tpm2\"\npin = \"1234\"",
            "[audit]\ntpm_countr = \"tpm\"",
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains("unknown field"), "{text}: {e}");
        }
    }

    #[test]
    fn mistakes_are_errors() {
        assert!(parse("[devices.tpm]\nkind = \"tpm2\"\ntcti = \"swtpm:path=/x\"").is_err());
        assert!(parse(
            "[devices.h]\nkind = \"pkcs11\"\nmodule = \"/m.so\"\ntoken = \"pkcs11:object=x\""
        )
        .unwrap_err()
        .contains("must name a token"));
        assert_eq!(
            parse("unseal_order = [\"nope\"]").unwrap_err(),
            "unseal_order names \"nope\", which is not a configured device"
        );
        assert!(parse("[devices.\"Bad Name\"]\nkind = \"tpm2\"")
            .unwrap_err()
            .contains("is not a device name"));
        assert!(parse("[dbus]\nbus = \"bogus\"")
            .unwrap_err()
            .starts_with("dbus.bus"));
        let hsm = |conf: &str| {
            format!(
                "[devices.{conf}]\nkind = \"pkcs11\"\nmodule = \"/m.so\"\n\
                 token = \"pkcs11:token={conf}\"\nsofthsm_conf = \"/{conf}.conf\"\n"
            )
        };
        assert!(parse(&format!("{}{}", hsm("a"), hsm("b")))
            .unwrap_err()
            .contains("differs from another device's"));
        assert_eq!(
            parse(&format!("{}[audit]\ntpm_counter = \"a\"", hsm("a"))).unwrap_err(),
            "audit.tpm_counter \"a\" is not a configured tpm2 device"
        );
    }

    #[test]
    fn transit_socket_is_off_unless_configured_and_checked() {
        assert!(parse("").unwrap().transit.is_none());
        let t = parse("[transit]\nmount = \"/kw/transit/\"")
            .unwrap()
            .transit
            .unwrap();
        assert_eq!(t.socket.path, Path::new("/run/keyward/transit.sock"));
        assert_eq!(t.socket.mode.to_string(), "0660");
        assert_eq!(t.limits.mount, "kw/transit");
        assert_eq!(t.limits.max_body, api::MAX_FRAME_LEN);
        for bad in ["\"\"", "\"a//b\"", "\"../x\"", "\"a b\""] {
            assert!(
                parse(&format!("[transit]\nmount = {bad}"))
                    .unwrap_err()
                    .starts_with("transit.mount"),
                "{bad}"
            );
        }
        assert!(parse("[transit]\nmax_connections = 0")
            .unwrap_err()
            .starts_with("transit.max_connections"));
        assert!(parse("[transit]\ntoken = \"x\"").is_err());
    }

    #[test]
    fn upstream_is_off_unless_configured_and_checked() {
        assert!(parse("").unwrap().upstream.is_none());
        let base = "[upstream]\naddress = \"https://127.0.0.1:8200\"\nca_file = \"/ca.pem\"\n\
                    cert_file = \"/host.pem\"\nkey = \"host-id\"\nrole = \"web\"\n";
        let u = parse(&format!(
            "{base}[[upstream.map]]\nremote = \"app/db\"\nsecret = \"db-pass\"\nfield = \"password\"\n\
             [[upstream.map]]\nremote = \"app/tls/\"\nsecret = \"tls/\"\n"
        ))
        .unwrap()
        .upstream
        .unwrap();
        assert_eq!(
            (
                u.servers[0].host.as_str(),
                u.servers[0].port,
                u.mount.as_str()
            ),
            ("127.0.0.1", 8200, "secret")
        );
        let nodes = parse(&base.replace(
            "address = \"https://127.0.0.1:8200\"",
            "address = [\"https://10.0.0.1:8200\", \"https://[::1]\"]",
        ))
        .unwrap()
        .upstream
        .unwrap()
        .servers;
        assert_eq!(
            nodes
                .iter()
                .map(|s| (s.host.as_str(), s.port))
                .collect::<Vec<_>>(),
            [("10.0.0.1", 8200), ("::1", 443)]
        );
        assert_eq!(u.on_remote_delete, OnRemoteDelete::Keep);
        assert_eq!(u.interval, Duration::from_secs(300));
        assert!(!u.mappings[0].is_prefix() && u.mappings[1].is_prefix());
        for (bad, key) in [
            ("address = \"http://127.0.0.1:8200\"", "upstream.address"),
            ("address = \"https://h/v1/x\"", "upstream.address"),
            ("address = []", "upstream.address"),
            (
                "address = [\"https://h:1\", \"http://h:2\"]",
                "upstream.address",
            ),
            ("role = \"a b\"", "upstream.role"),
            ("key = \"a b\"", "upstream.key"),
            ("mount = \"../x\"", "upstream.mount"),
            ("interval_secs = 0", "upstream.interval_secs"),
        ] {
            let name = bad.split(' ').next().unwrap();
            let text: String = base
                .lines()
                .filter(|l| !l.starts_with(&format!("{name} ")))
                .map(|l| format!("{l}\n"))
                .collect();
            let e = parse(&format!("{text}{bad}\n")).unwrap_err();
            assert!(e.starts_with(key), "{bad}: {e}");
        }
        for (remote, secret, key) in [
            ("app/../x", "x", "upstream.map[0].remote"),
            ("/app", "x", "upstream.map[0].remote"),
            ("app/", "x", "upstream.map[0].secret"),
            ("app", "x y", "upstream.map[0].secret"),
        ] {
            let e = parse(&format!(
                "{base}[[upstream.map]]\nremote = \"{remote}\"\nsecret = \"{secret}\"\n"
            ))
            .unwrap_err();
            assert!(e.starts_with(key), "{remote} -> {secret}: {e}");
        }
    }

    #[test]
    fn limits_default_and_bounds() {
        let l = parse("").unwrap().varlink;
        assert_eq!(
            (l.max_connections, l.max_connections_per_uid, l.root_reserve),
            (256, 64, 16)
        );
        assert!(l.max_connections_per_uid < l.max_connections - l.root_reserve);
        assert!(
            l.idle_timeout <= Duration::from_secs(10),
            "idle connections hold slots"
        );
        let l =
            parse("[limits]\nmax_connections = 8\nmax_connections_per_uid = 2\nroot_reserve = 1")
                .unwrap()
                .varlink;
        assert_eq!(
            (l.max_connections, l.max_connections_per_uid, l.root_reserve),
            (8, 2, 1)
        );
    }
}
