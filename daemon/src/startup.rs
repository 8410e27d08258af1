//! Start-up: the one place that assembles the daemon from its checked [`Config`], in order —
//! process environment, devices, store, audit log, vault, service, sockets, unattended unseal,
//! transports, health tasks — and hands back a running [`Daemon`] that `main` keeps until a
//! signal says reload or stop. Each stage is a small function with its own [`StartError`]
//! variant, so a failed start says which stage failed and why.
//!
//! It owns the order of things, because the order is the behaviour: signal handlers before
//! anything (installed by `main`), sockets bound before the unseal (early clients wait in the
//! backlog), `READY=1` only after the unattended unseal and the settling of key operations a
//! crash cut short, the D-Bus name owned before `READY=1`, and at stop every transport drained
//! before the audit log's last checkpoint. It must not serve, decide or keep anything itself:
//! requests are the service's, devices the actors', and no subsystem here reads the config
//! file (they are handed the typed settings [`Config`] holds).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::net::UnixListener as StdListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keyward_policy::{Policy, PolicyError};
use sd_notify::NotifyState;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::audit::AuditLog;
use crate::config::{Config, ConfigError, CredentialSettings, SocketSettings, TransitSettings};
use crate::device::{self, DeviceHandle, DeviceSpec};
use crate::health::{self, StatusLine};
use crate::service::Service;
use crate::store::Store;
use crate::sys;
use crate::transport::dbus::{self, DbusError};
use crate::transport::{credentials, socket, ssh_agent, transit, varlink};
use crate::upstream;
use crate::vault::Vault;

/// How long the stop waits for the device threads to close their devices.
const DEVICE_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a subsystem said when its stage failed.
type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why the daemon could not start (or could not take a new policy), one variant per stage.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config file can't be read or has a bad setting.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The SoftHSM config a device names is not there.
    #[error("softhsm_conf {} does not exist", path.display())]
    SoftHsmConfMissing {
        /// `devices.*.softhsm_conf`.
        path: PathBuf,
    },
    /// A SoftHSM device names no SoftHSM config, and none is taken from the environment.
    #[error(
        "devices.{device} is SoftHSM but names no config: add \
         `softhsm_conf = \"/etc/keyward/softhsm2.conf\"` (your SoftHSM config) to \
         [devices.{device}] in keywardd.toml{}",
        match inherited {
            Some(env) => format!(
                " (SOFTHSM2_CONF={} from the environment is ignored: keywardd uses only \
                 the config its own file names)",
                env.display()
            ),
            None => String::new(),
        }
    )]
    SoftHsmUnnamed {
        /// The device's name.
        device: String,
        /// `SOFTHSM2_CONF` as inherited (dropped).
        inherited: Option<PathBuf>,
    },
    /// The state directory can't be made private.
    #[error("{0}")]
    StateDir(String),
    /// The async runtime can't be built.
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The signal handlers can't be installed.
    #[error("signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// The database can't be opened.
    #[error("store {}: {source}", path.display())]
    Store {
        /// The database file.
        path: PathBuf,
        /// What the store said.
        source: Cause,
    },
    /// The policy file can't be loaded.
    #[error("policy {}: {source}", path.display())]
    Policy {
        /// The policy file.
        path: PathBuf,
        /// What is wrong with it.
        source: Box<PolicyError>,
    },
    /// The audit log can't be opened.
    #[error("audit log: {0}")]
    Audit(#[source] Cause),
    /// The vault can't be loaded from the store.
    #[error("{0}")]
    Vault(#[source] Cause),
    /// The audit log can't be bound to the configured TPM counter.
    #[error("audit.tpm_counter: {0}")]
    TpmCounter(String),
    /// `LISTEN_FDS` names sockets that can't be taken.
    #[error("LISTEN_FDS: {0}")]
    Activation(#[source] std::io::Error),
    /// An activated socket can't be served.
    #[error("activated {what} socket: {source}")]
    ActivatedSocket {
        /// `api`, `credentials`, `transit` or `ssh-agent`.
        what: &'static str,
        /// Why tokio refused it.
        source: std::io::Error,
    },
    /// Sockets were passed in, none of them the API.
    #[error("socket-activated without an `api` socket (FileDescriptorName=api)")]
    NoApiSocket,
    /// A configured socket can't be bound.
    #[error("cannot listen on {}: {source}", path.display())]
    Bind {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configured D-Bus service can't start.
    #[error(transparent)]
    Dbus(#[from] DbusError),
    /// The vault's state can't be read for the first status line.
    #[error("{0}")]
    Status(#[source] Cause),
}

/// Before the runtime and any thread exist: export SoftHSM's config and make the state
/// directory private. Environment changes are sound only while the process is single-threaded.
///
/// # Errors
/// [`StartError::SoftHsmConfMissing`], [`StartError::SoftHsmUnnamed`], [`StartError::StateDir`].
pub fn prepare_process(config: &Config) -> Result<(), StartError> {
    export_softhsm_conf(config)?;
    sys::private_dir(&config.state_dir).map_err(StartError::StateDir)
}

/// SoftHSM reads `SOFTHSM2_CONF` from the environment at `C_Initialize`; set it from the config.
/// An inherited `SOFTHSM2_CONF` is dropped when the config names none: the daemon runs only on
/// a SoftHSM config its own config names.
pub(crate) fn export_softhsm_conf(config: &Config) -> Result<(), StartError> {
    if let Some(path) = &config.softhsm_conf {
        if !path.is_file() {
            return Err(StartError::SoftHsmConfMissing { path: path.clone() });
        }
        // Single-threaded here (no runtime, no device threads yet): the one sound moment.
        std::env::set_var("SOFTHSM2_CONF", path);
        tracing::info!(softhsm2_conf = %path.display(), "SoftHSM config");
        return Ok(());
    }
    let inherited = std::env::var_os("SOFTHSM2_CONF").map(PathBuf::from);
    if inherited.is_some() {
        // Single-threaded, as above.
        std::env::remove_var("SOFTHSM2_CONF");
    }
    // A SoftHSM device without softhsm_conf would only fail later, naming the variable; name
    // the setting that fixes it now.
    let softhsm = config.devices.iter().find(|(_, d)| {
        matches!(d, DeviceSpec::Pkcs11(p) if p.module.to_string_lossy().contains("softhsm"))
    });
    if let Some((name, _)) = softhsm {
        return Err(StartError::SoftHsmUnnamed {
            device: name.clone(),
            inherited,
        });
    }
    if inherited.is_some() {
        tracing::info!("ignoring SOFTHSM2_CONF from the environment: no device names softhsm_conf");
    }
    Ok(())
}

/// The policy the config names, or deny-all (with a warning) when it names none.
///
/// # Errors
/// [`StartError::Policy`]: the file can't be read or isn't a valid policy.
pub fn load_policy(path: Option<&Path>) -> Result<Policy, StartError> {
    match path {
        Some(path) => Policy::load(path).map_err(|source| StartError::Policy {
            path: path.to_owned(),
            source: Box::new(source),
        }),
        None => {
            tracing::warn!("no policy file configured: every request but Status is denied");
            Ok(Policy::deny_all())
        }
    }
}

/// One actor thread per configured device; each starts opening its device at once.
fn spawn_devices(config: &Config) -> BTreeMap<String, DeviceHandle> {
    config
        .devices
        .iter()
        .map(|(name, spec)| {
            let handle = DeviceHandle::spawn(
                name.clone(),
                spec.kind(),
                device::opener(name, spec),
                config.actor,
            );
            (name.clone(), handle)
        })
        .collect()
}

/// The vault on the store and devices, with the audit log told of it (and bound to its TPM
/// counter when configured) and its state changes sent to `STATUS=`.
async fn open_vault(
    config: &Config,
    devices: BTreeMap<String, DeviceHandle>,
    store: Store,
    audit: &Arc<AuditLog>,
    status_line: &Arc<StatusLine>,
) -> Result<Vault, StartError> {
    let on_change: Arc<dyn Fn(&str) + Send + Sync> = {
        let status_line = status_line.clone();
        Arc::new(move |line: &str| status_line.vault(line))
    };
    let vault = Vault::load(
        store,
        devices,
        config.unseal_order.clone(),
        config.confirm_within,
        on_change,
    )
    .await
    .map_err(|e| StartError::Vault(Box::new(e)))?;
    if let Some(counter) = &config.tpm_counter {
        // The config checked that it names a tpm2 device, so its actor exists.
        let device = vault
            .devices()
            .get(&counter.device)
            .cloned()
            .ok_or_else(|| {
                StartError::TpmCounter(format!("{:?} has no device actor", counter.device))
            })?;
        audit
            .set_counter(device, counter.index)
            .map_err(StartError::TpmCounter)?;
    }
    vault.set_audit(audit.clone());
    Ok(vault)
}

/// Where start-up's time goes, stage by stage, at debug level (`KEYWARD_LOG=keywardd=debug`):
/// the time since start-up began at the end of each stage.
struct Stages(std::time::Instant);

impl Stages {
    fn new() -> Self {
        Self(std::time::Instant::now())
    }

    fn done(&self, stage: &str) {
        tracing::debug!(
            stage,
            at_ms = self.0.elapsed().as_secs_f64() * 1e3,
            "start-up"
        );
    }
}

/// The sockets to serve: passed in by systemd, or bound from the config.
struct Listeners {
    api: UnixListener,
    credentials: Option<UnixListener>,
    ssh_agent: Option<UnixListener>,
    transit: Option<UnixListener>,
    activated: bool,
}

/// Under socket activation systemd owns the paths (and /run is read-only to us): never bind
/// then. A single socket passed without a name (plain `systemd-socket-activate -l`) is the API.
fn listeners(config: &Config) -> Result<Listeners, StartError> {
    let activated = sys::activated_listeners().map_err(StartError::Activation)?;
    pick_listeners(activated, config)
}

fn pick_listeners(
    mut activated: HashMap<String, StdListener>,
    config: &Config,
) -> Result<Listeners, StartError> {
    let socket_activated = !activated.is_empty();
    let tokio_listener = |l: StdListener, what: &'static str| {
        UnixListener::from_std(l).map_err(|source| StartError::ActivatedSocket { what, source })
    };
    let api = activated.remove("api").or_else(|| {
        let named = ["credentials", "transit", "ssh-agent"]
            .iter()
            .any(|n| activated.contains_key(*n));
        let only = (activated.len() == 1 && !named)
            .then(|| activated.keys().next().cloned())
            .flatten()?;
        activated.remove(&only)
    });
    let api = match api {
        Some(l) => tokio_listener(l, "api")?,
        None if socket_activated => return Err(StartError::NoApiSocket),
        None => bind(&config.api)?,
    };
    let credentials = match (activated.remove("credentials"), &config.credentials) {
        (Some(l), _) => Some(tokio_listener(l, "credentials")?),
        (None, Some(c)) if !socket_activated => Some(bind(&c.socket)?),
        (None, _) => None,
    };
    let ssh_agent = match (activated.remove("ssh-agent"), &config.ssh_agent) {
        (Some(l), _) => Some(tokio_listener(l, "ssh-agent")?),
        (None, Some(a)) if !socket_activated => Some(bind(&a.socket)?),
        (None, Some(_)) => {
            tracing::warn!("[ssh_agent] is configured, but systemd passed no socket named \"ssh-agent\": the ssh-agent socket is not served");
            None
        }
        (None, None) => None,
    };
    let transit = match (activated.remove("transit"), &config.transit) {
        (Some(l), _) => Some(tokio_listener(l, "transit")?),
        (None, Some(t)) if !socket_activated => Some(bind(&t.socket)?),
        (None, Some(_)) => {
            tracing::warn!("[transit] is configured, but systemd passed no socket named \"transit\" (keywardd-transit.socket): the transit socket is not served");
            None
        }
        (None, None) => None,
    };
    for name in activated.keys() {
        tracing::warn!(name = %name, "ignoring an activated socket with an unknown FileDescriptorName");
    }
    Ok(Listeners {
        api,
        credentials,
        ssh_agent,
        transit,
        activated: socket_activated,
    })
}

fn bind(settings: &SocketSettings) -> Result<UnixListener, StartError> {
    socket::bind(&settings.path, settings.mode).map_err(|source| StartError::Bind {
        path: settings.path.clone(),
        source,
    })
}

/// Readiness means the devices have been tried and the unattended unseal is done, so a consumer
/// ordered after us does not race the unseal. Bounded: a hung device must not hold start-up
/// forever (its calls time out the same way). The unseal goes ahead once the devices it tries
/// have been tried, while the others are still opening (a token's login need not wait for the
/// TPM's unseal, nor the other way round). Key operations a crash cut short are settled once
/// every device is up, before requests.
async fn unseal_and_settle(
    service: &Service,
    audit: &Arc<AuditLog>,
    config: &Config,
    stages: &Stages,
) {
    let wait = config.actor.timeout;
    let (unsealers, others): (Vec<_>, Vec<_>) = service
        .vault()
        .devices()
        .values()
        .partition(|d| config.unseal_order.iter().any(|n| n == d.name()));
    let unseal = async {
        tried(unsealers, wait).await;
        stages.done("unseal devices opened");
        service.vault().unseal_unattended().await;
        stages.done("unattended unseal");
    };
    tokio::join!(unseal, tried(others, wait));
    stages.done("every device opened");
    for line in service.vault().settle_key_intents().await {
        if let Err(e) = audit.event("key-sweep", &line).await {
            tracing::error!("audit log: {e}");
        }
    }
}

/// Wait until each of `devices` has been tried once, at most `wait` for each.
async fn tried(devices: Vec<&DeviceHandle>, wait: std::time::Duration) {
    for device in devices {
        if tokio::time::timeout(wait, device.ready()).await.is_err() {
            tracing::warn!(
                device = device.name(),
                "device still opening after {wait:?}; going on"
            );
        }
    }
}

/// Start the OpenBao upstream sync and wait, at most `initial_sync_timeout`, for its first sync,
/// so that units ordered after us get fresh values when the cluster is reachable; when it is
/// not, they get the last synced ones (the sync goes on in the background either way).
async fn start_upstream(
    service: &Arc<Service>,
    settings: &crate::config::UpstreamSettings,
    stopped: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let (handle, task) = upstream::new(settings.clone());
    service.set_upstream(Arc::clone(&handle));
    let join = tokio::spawn(upstream::run(
        Arc::clone(&handle),
        Arc::clone(service),
        task,
        stopped,
    ));
    if !handle.wait_finished(1, settings.initial_sync_timeout).await {
        tracing::warn!(
            "the first upstream sync did not finish within {:?}: going on with the values synced before",
            settings.initial_sync_timeout
        );
    }
    join
}

/// The first status line: sealed and why, or who unsealed.
async fn vault_line(service: &Service) -> Result<String, StartError> {
    let status = service
        .vault()
        .status()
        .await
        .map_err(|e| StartError::Status(Box::new(e)))?;
    Ok(if status.sealed {
        format!("sealed: {}", status.reason.unwrap_or_default())
    } else {
        format!("unsealed by {}", status.unsealed_by.unwrap_or_default())
    })
}

/// A started daemon: transports serving, health tasks running, `READY=1` sent. Keep it until a
/// signal; then [`Daemon::reload_policy`] or [`Daemon::stop`].
#[derive(Debug)]
pub struct Daemon {
    service: Arc<Service>,
    audit: Arc<AuditLog>,
    stop: watch::Sender<bool>,
    varlink: JoinHandle<()>,
    dbus: Option<JoinHandle<Result<(), DbusError>>>,
    credentials: Option<JoinHandle<()>>,
    ssh_agent: Option<JoinHandle<()>>,
    transit: Option<JoinHandle<()>>,
    upstream: Option<JoinHandle<()>>,
    device_watch: JoinHandle<()>,
    watchdog_stop: watch::Sender<bool>,
    watchdog: Option<JoinHandle<()>>,
    outbox_cleaner: JoinHandle<()>,
}

/// Assemble and start the daemon; `READY=1` has been sent when this returns.
///
/// # Errors
/// The first stage that failed; nothing is served then.
pub async fn start(config: &Config) -> Result<Daemon, StartError> {
    let stages = Stages::new();
    // First: the devices open on their own threads (a token's initialisation and login, the
    // TPM's connection) while the store and the audit log open here.
    let devices = spawn_devices(config);
    let database = config.database();
    let store = Store::open(&database).map_err(|e| StartError::Store {
        path: database,
        source: Box::new(e),
    })?;
    stages.done("store opened");
    let policy = load_policy(config.policy.as_deref())?;
    // Before the first unseal: the vault hands the audit log its signing key when it opens.
    let audit = AuditLog::open(&config.state_dir, config.audit)
        .map_err(|e| StartError::Audit(Box::new(e)))?;
    // Before anything is served: the records of secret changes committed before the last stop
    // that the log does not hold yet go in, in order.
    audit
        .open_outbox(&store)
        .await
        .map_err(|e| StartError::Audit(Box::new(e)))?;
    let outbox_cleaner = audit.spawn_outbox_cleaner(store.clone());
    stages.done("audit log opened");
    // The audit log is told first (it checks its anchor as the vault opens): what it found
    // rides on every status line.
    let status_line = StatusLine::new(audit.clone());
    let vault = open_vault(config, devices, store.clone(), &audit, &status_line).await?;
    let service = Arc::new(Service::new(vault, policy, audit.clone()));
    stages.done("vault loaded");

    // Listen before unsealing: early clients wait in the backlog instead of failing.
    let listeners = listeners(config)?;
    unseal_and_settle(&service, &audit, config, &stages).await;
    stages.done("key operations settled");

    let (stop, stopped) = watch::channel(false);
    let varlink = tokio::spawn(varlink::serve(
        listeners.api,
        service.clone(),
        config.varlink,
        stopped.clone(),
    ));
    // D-Bus: the name is owned before READY=1, so a client ordered after us finds it. A bus that
    // refuses us (name taken, policy not installed) fails the start: it was configured.
    let dbus = match &config.dbus {
        Some(settings) => {
            let dbus = dbus::start(&settings.bus, settings.limits, service.clone()).await?;
            Some(tokio::spawn(dbus.run(stopped.clone())))
        }
        None => None,
    };
    let credentials = listeners.credentials.map(|l| {
        // An activated credential socket without a [credentials] table gets the defaults.
        let limits = config
            .credentials
            .as_ref()
            .map_or_else(CredentialSettings::default_limits, |c| c.limits);
        tokio::spawn(credentials::serve(
            l,
            service.clone(),
            limits,
            stopped.clone(),
        ))
    });
    let ssh_agent = listeners.ssh_agent.map(|l| {
        let limits = config
            .ssh_agent
            .as_ref()
            .map_or_else(crate::config::SshAgentSettings::default_limits, |a| {
                a.limits
            });
        tokio::spawn(ssh_agent::serve(
            l,
            service.clone(),
            limits,
            stopped.clone(),
        ))
    });
    let transit = listeners.transit.map(|l| {
        // An activated transit socket without a [transit] table gets the defaults.
        let limits = config
            .transit
            .as_ref()
            .map_or_else(TransitSettings::default_limits, |t| t.limits.clone());
        tokio::spawn(transit::serve(l, service.clone(), limits, stopped.clone()))
    });

    let upstream = match &config.upstream {
        Some(settings) => Some(start_upstream(&service, settings, stopped.clone()).await),
        None => None,
    };

    let line = vault_line(&service).await?;
    // From READY=1 on, systemd counts the watchdog interval. The pings go on while requests
    // drain (a drain may take as long as a device call), so they stop on their own signal.
    let (watchdog_stop, watchdog_stopped) = watch::channel(false);
    let watchdog = sys::watchdog_interval().map(|interval| {
        tokio::spawn(health::watchdog(
            interval,
            store,
            audit.clone(),
            status_line.clone(),
            watchdog_stopped,
        ))
    });
    let line = status_line.ready(&line);
    stages.done("ready");
    tracing::info!(socket_activated = listeners.activated, "{line}; ready");
    let device_watch = tokio::spawn(health::watch_devices(
        service.vault().devices().clone(),
        config.device_watch,
        status_line,
        stopped,
    ));
    Ok(Daemon {
        service,
        audit,
        stop,
        varlink,
        dbus,
        credentials,
        ssh_agent,
        transit,
        upstream,
        device_watch,
        watchdog_stop,
        watchdog,
        outbox_cleaner,
    })
}

impl Daemon {
    /// SIGHUP: re-read the config file's policy path and the policy; a bad file keeps the old
    /// policy. Either way the reload is on record: who may do what changed, or an attempt to.
    ///
    /// # Errors
    /// The config or policy that was rejected (the old policy stays in force).
    pub async fn reload_policy(&self, config_path: &Path) -> Result<(), StartError> {
        let loaded = Config::load(config_path)
            .map_err(StartError::from)
            .and_then(|c| load_policy(c.policy.as_deref()));
        let detail = match &loaded {
            Ok(_) => "new policy in force",
            Err(_) => "rejected: the old policy stays",
        };
        let reloaded = loaded.map(|policy| self.service.set_policy(policy));
        if let Err(e) = self.audit.event("policy-reload", detail).await {
            tracing::error!("audit log: {e}");
        }
        reloaded
    }

    /// SIGTERM: stop accepting, drain the requests in flight on every transport, stop the
    /// health tasks, and write the audit log's last checkpoint over every drained request.
    pub async fn stop(self) {
        sys::notify(&[NotifyState::Stopping]);
        tracing::info!("stopping: draining in-flight requests");
        let _ = self.stop.send(true);
        let _ = self.varlink.await;
        if let Some(d) = self.dbus {
            if let Ok(Err(e)) = d.await {
                tracing::warn!("{e}");
            }
        }
        if let Some(c) = self.credentials {
            let _ = c.await;
        }
        if let Some(a) = self.ssh_agent {
            let _ = a.await;
        }
        if let Some(t) = self.transit {
            let _ = t.await;
        }
        if let Some(u) = self.upstream {
            let _ = u.await;
        }
        let _ = self.device_watch.await;
        let _ = self.watchdog_stop.send(true);
        if let Some(w) = self.watchdog {
            let _ = w.await;
        }
        // Last: every drained request is on record; a final checkpoint signs them.
        self.audit.shutdown();
        // Every record is durable now: the outbox is emptied, so the next start reads nothing.
        self.outbox_cleaner.abort();
        if let Err(e) = self.audit.clean_outbox(self.service.vault().store()).await {
            tracing::warn!("audit outbox: at stop: {e}");
        }
        // Then let go of the devices and wait, bounded, for their threads to close them, so that
        // no device library is mid-close while the process exits.
        let closing: Vec<_> = self
            .service
            .vault()
            .devices()
            .iter()
            .map(|(name, d)| (name.clone(), d.closed()))
            .collect();
        drop(self.service);
        drop(self.audit);
        let deadline = tokio::time::Instant::now() + DEVICE_CLOSE_WAIT;
        for (name, closed) in closing {
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                tracing::warn!(device = %name, "device still closing at exit");
            }
        }
        tracing::info!("stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listening socket as systemd passes it (keywardd sets passed sockets non-blocking).
    fn listener(dir: &Path, name: &str) -> StdListener {
        let l = StdListener::bind(dir.join(name)).unwrap();
        l.set_nonblocking(true).unwrap();
        l
    }

    /// Under socket activation the transit and ssh-agent sockets are systemd's
    /// (`FileDescriptorName=transit`, `ssh-agent`): served, never bound from the config, and
    /// never mistaken for the API socket.
    #[tokio::test]
    async fn activated_transit_and_ssh_agent_sockets_are_served_and_never_taken_for_the_api() {
        let picked_one = |l: &Listeners, name: &str| match name {
            "transit" => l.transit.is_some(),
            _ => l.ssh_agent.is_some(),
        };
        for (name, table) in [("transit", "transit"), ("ssh-agent", "ssh_agent")] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("keywardd.toml");
            let (api, bound) = (dir.path().join("api.sock"), dir.path().join("named.sock"));
            std::fs::write(
                &path,
                format!(
                    "[api]\nsocket = {api:?}\n[{table}]\nsocket = {bound:?}\n",
                    api = api.display().to_string(),
                    bound = bound.display().to_string()
                ),
            )
            .unwrap();
            let config = Config::load(&path).unwrap();
            let activated = HashMap::from([
                ("api".to_owned(), listener(dir.path(), "a")),
                (name.to_owned(), listener(dir.path(), "t")),
            ]);
            let picked = pick_listeners(activated, &config).unwrap_or_else(|e| panic!("{e}"));
            assert!(picked_one(&picked, name), "{name}");
            assert!(
                !bound.exists() && !api.exists(),
                "nothing bound under activation"
            );
            let lone = HashMap::from([(name.to_owned(), listener(dir.path(), "t2"))]);
            assert!(matches!(
                pick_listeners(lone, &config),
                Err(StartError::NoApiSocket)
            ));
            // Not activated: the configured paths are bound.
            let picked = pick_listeners(HashMap::new(), &config).unwrap_or_else(|e| panic!("{e}"));
            assert!(picked_one(&picked, name) && bound.exists() && api.exists());
        }
    }
}
