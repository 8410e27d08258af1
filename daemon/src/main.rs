//! `keywardd`: start-up, readiness, signals. Everything it serves lives in the library.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use keyward_policy::Policy;
use keywardd::audit::AuditLog;
use keywardd::config::{Config, DeviceConfig, DEFAULT_CONFIG};
use keywardd::device::{self, ActorOptions, DeviceHandle};
use keywardd::service::Service;
use keywardd::store::Store;
use keywardd::sys;
use keywardd::transport::credentials::{self, CredentialLimits};
use keywardd::transport::socket;
use keywardd::transport::varlink::{self, VarlinkLimits};
use keywardd::vault::Vault;
use sd_notify::NotifyState;
use tokio::signal::unix::{signal, SignalKind};

/// The Keyward daemon: a vault master key sealed to a TPM or PKCS#11 token, secrets encrypted
/// under it, signing inside the devices.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The configuration file.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

fn main() -> ExitCode {
    // Before any secret exists and before any thread starts.
    if let Err(e) = sys::harden() {
        eprintln!("keywardd: cannot harden the process: {e}");
        return ExitCode::FAILURE;
    }
    let args = Args::parse();
    keywardd::logging::init();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = export_softhsm_conf(&config) {
        tracing::error!("{e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = sys::private_dir(&config.state_dir) {
        tracing::error!("{e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, args.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            sys::notify(&[NotifyState::Status(&format!("failed: {e}"))]);
            ExitCode::FAILURE
        }
    }
}

/// SoftHSM reads `SOFTHSM2_CONF` from the environment at `C_Initialize`; set it from the config
/// while the process is still single-threaded. An inherited `SOFTHSM2_CONF` is dropped when the
/// config names none: the daemon runs only on a SoftHSM config its own config names.
fn export_softhsm_conf(config: &Config) -> Result<(), String> {
    let mut chosen: Option<&PathBuf> = None;
    for (name, device) in &config.devices {
        if let DeviceConfig::Pkcs11 {
            softhsm_conf: Some(path),
            ..
        } = device
        {
            if chosen.is_some_and(|c| c != path) {
                return Err(format!("devices.{name}.softhsm_conf differs from another device's: SoftHSM reads one config per process"));
            }
            chosen = Some(path);
        }
    }
    if let Some(path) = chosen {
        if !path.is_file() {
            return Err(format!("softhsm_conf {} does not exist", path.display()));
        }
        // Single-threaded here (no runtime, no device threads yet): the one sound moment.
        std::env::set_var("SOFTHSM2_CONF", path);
        tracing::info!(softhsm2_conf = %path.display(), "SoftHSM config");
    } else {
        let inherited = std::env::var_os("SOFTHSM2_CONF");
        if inherited.is_some() {
            // Single-threaded, as above.
            std::env::remove_var("SOFTHSM2_CONF");
        }
        // A SoftHSM device without softhsm_conf would only fail later, naming the variable;
        // name the setting that fixes it now.
        let softhsm = config.devices.iter().find(|(_, d)| {
            matches!(d, DeviceConfig::Pkcs11 { module, .. }
                if module.to_string_lossy().contains("softhsm"))
        });
        if let Some((name, _)) = softhsm {
            let hint = match &inherited {
                Some(env) => format!(
                    " (SOFTHSM2_CONF={} from the environment is ignored: keywardd uses only \
                     the config its own file names)",
                    std::path::Path::new(env).display()
                ),
                None => String::new(),
            };
            return Err(format!(
                "devices.{name} is SoftHSM but names no config: add \
                 `softhsm_conf = \"/etc/keyward/softhsm2.conf\"` (your SoftHSM config) to \
                 [devices.{name}] in keywardd.toml{hint}"
            ));
        }
        if inherited.is_some() {
            tracing::info!(
                "ignoring SOFTHSM2_CONF from the environment: no device names softhsm_conf"
            );
        }
    }
    Ok(())
}

fn load_policy(config: &Config) -> Result<Policy, String> {
    match &config.policy {
        Some(path) => Policy::load(path).map_err(|e| format!("policy {}: {e}", path.display())),
        None => {
            tracing::warn!("no policy file configured: every request but Status is denied");
            Ok(Policy::deny_all())
        }
    }
}

async fn run(config: Config, config_path: PathBuf) -> Result<(), String> {
    // Handlers first: a SIGTERM that lands during start-up (or right after READY=1) must drain,
    // not kill with the default action.
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let store = Store::open(&config.database())
        .map_err(|e| format!("store {}: {e}", config.database().display()))?;
    let policy = load_policy(&config)?;
    let options = ActorOptions::from_limits(&config.limits);
    let devices: BTreeMap<String, DeviceHandle> = config
        .devices
        .iter()
        .map(|(name, cfg)| {
            let opener = device::opener_from_config(name, cfg);
            (
                name.clone(),
                DeviceHandle::spawn(name.clone(), cfg.kind(), opener, options),
            )
        })
        .collect();
    // Before the first unseal: the vault hands the audit log its signing key when it opens.
    let audit = AuditLog::open(&config.state_dir, config.audit.options()?)
        .map_err(|e| format!("audit log: {e}"))?;
    // The audit log is told first (it checks its anchor as the vault opens): what it found
    // rides on every status line.
    let status_line = keywardd::health::StatusLine::new(audit.clone());
    let on_change: Arc<dyn Fn(&str) + Send + Sync> = {
        let status_line = status_line.clone();
        Arc::new(move |line: &str| status_line.vault(line))
    };
    let confirm_within = Duration::from_secs(config.recovery.confirm_within_secs);
    let vault = Vault::load(
        store.clone(),
        devices,
        config.unseal_order(),
        confirm_within,
        on_change,
    )
    .await
    .map_err(|e| e.to_string())?;
    if let Some(name) = &config.audit.tpm_counter {
        let device = match (config.devices.get(name), vault.devices().get(name)) {
            (Some(DeviceConfig::Tpm2 { .. }), Some(d)) => d.clone(),
            _ => {
                return Err(format!(
                    "audit.tpm_counter: {name:?} is not a configured tpm2 device"
                ))
            }
        };
        audit.set_counter(device, config.audit.tpm_counter_index)?;
    }
    vault.set_audit(audit.clone());
    let service = Arc::new(Service::new(vault, policy, audit.clone()));

    // Listen before unsealing: early clients wait in the backlog instead of failing. Under
    // socket activation systemd owns the paths (and /run is read-only to us): never bind then.
    let mut activated = sys::activated_listeners().map_err(|e| format!("LISTEN_FDS: {e}"))?;
    let socket_activated = !activated.is_empty();
    let tokio_listener = |l: std::os::unix::net::UnixListener, what: &str| {
        tokio::net::UnixListener::from_std(l).map_err(|e| format!("activated {what} socket: {e}"))
    };
    // A single socket passed without a name (plain `systemd-socket-activate -l`) is the API.
    let api = activated.remove("api").or_else(|| {
        let only = (activated.len() == 1 && !activated.contains_key("credentials"))
            .then(|| activated.keys().next().cloned())
            .flatten()?;
        activated.remove(&only)
    });
    let listener = match api {
        Some(l) => tokio_listener(l, "api")?,
        None if socket_activated => {
            return Err("socket-activated without an `api` socket (FileDescriptorName=api)".into())
        }
        None => {
            let mode = config.api.mode_bits()?;
            socket::bind(&config.api.socket, mode)
                .map_err(|e| format!("cannot listen on {}: {e}", config.api.socket.display()))?
        }
    };
    let credentials_listener = match (activated.remove("credentials"), &config.credentials) {
        (Some(l), _) => Some(tokio_listener(l, "credentials")?),
        (None, Some(c)) if !socket_activated => Some(
            socket::bind(&c.socket, c.mode_bits()?)
                .map_err(|e| format!("cannot listen on {}: {e}", c.socket.display()))?,
        ),
        (None, _) => None,
    };
    for name in activated.keys() {
        tracing::warn!(name = %name, "ignoring an activated socket with an unknown FileDescriptorName");
    }

    // Readiness means the devices have been tried and the unattended unseal is done, so a
    // consumer ordered after us does not race the unseal. Bounded: a hung device must not hold
    // start-up forever (its calls time out the same way).
    let wait = std::time::Duration::from_secs(config.limits.device_timeout_secs);
    for device in service.vault().devices().values() {
        if tokio::time::timeout(wait, device.ready()).await.is_err() {
            tracing::warn!(
                device = device.name(),
                "device still opening after {wait:?}; going on"
            );
        }
    }
    service.vault().unseal_unattended().await;
    // Key operations a crash cut short are settled once the devices are up, before requests.
    for line in service.vault().settle_key_intents().await {
        if let Err(e) = audit.event("key-sweep", &line) {
            tracing::error!("audit log: {e}");
        }
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let limits = VarlinkLimits::from_config(&config.limits);
    let server = tokio::spawn(varlink::serve(
        listener,
        service.clone(),
        limits,
        stop_rx.clone(),
    ));
    // D-Bus: the name is owned before READY=1, so a client ordered after us finds it. A bus that
    // refuses us (name taken, policy not installed) fails the start: it was configured.
    let dbus_task = match &config.dbus {
        Some(c) => {
            let dbus = keywardd::transport::dbus::start(c, service.clone())
                .await
                .map_err(|e| e.to_string())?;
            Some(tokio::spawn(dbus.run(stop_rx.clone())))
        }
        None => None,
    };
    let credentials_server = credentials_listener.map(|l| {
        let limits = CredentialLimits {
            wait_unsealed: Duration::from_secs(
                config
                    .credentials
                    .as_ref()
                    .map_or(60, |c| c.wait_unsealed_secs),
            ),
            max_connections: 1024,
            write_timeout: Duration::from_secs(10),
        };
        tokio::spawn(credentials::serve(
            l,
            service.clone(),
            limits,
            stop_rx.clone(),
        ))
    });

    let status = service.vault().status().await.map_err(|e| e.to_string())?;
    let line = if status.sealed {
        format!("sealed: {}", status.reason.unwrap_or_default())
    } else {
        format!("unsealed by {}", status.unsealed_by.unwrap_or_default())
    };
    // From READY=1 on, systemd counts the watchdog interval. The pings go on while requests
    // drain (a drain may take as long as a device call), so they stop on their own signal.
    let (watchdog_stop, watchdog_stopped) = tokio::sync::watch::channel(false);
    let watchdog = sys::watchdog_interval().map(|interval| {
        tokio::spawn(keywardd::health::watchdog(
            interval,
            store,
            audit.clone(),
            status_line.clone(),
            watchdog_stopped,
        ))
    });
    let line = status_line.ready(&line);
    tracing::info!(socket_activated, "{line}; ready");
    let device_watch = tokio::spawn(keywardd::health::watch_devices(
        service.vault().devices().clone(),
        Duration::from_secs(config.limits.device_watch_secs),
        status_line,
        stop_rx.clone(),
    ));

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // Re-read the config's policy path; a bad file keeps the old policy.
                match Config::load(&config_path).map_err(|e| e.to_string()).and_then(|c| load_policy(&c)) {
                    Ok(p) => {
                        service.set_policy(p);
                        tracing::info!("policy reloaded");
                        // Who may do what changed: that belongs on record.
                        if let Err(e) = audit.event("policy-reload", "new policy in force") {
                            tracing::error!("audit log: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::error!("policy reload rejected, keeping the old policy: {e}");
                        if let Err(e) = audit.event("policy-reload", "rejected: the old policy stays") {
                            tracing::error!("audit log: {e}");
                        }
                    }
                }
            }
        }
    }
    sys::notify(&[NotifyState::Stopping]);
    tracing::info!("stopping: draining in-flight requests");
    let _ = stop_tx.send(true);
    let _ = server.await;
    if let Some(d) = dbus_task {
        if let Ok(Err(e)) = d.await {
            tracing::warn!("{e}");
        }
    }
    if let Some(c) = credentials_server {
        let _ = c.await;
    }
    let _ = device_watch.await;
    let _ = watchdog_stop.send(true);
    if let Some(w) = watchdog {
        let _ = w.await;
    }
    // Last: every drained request is on record; a final checkpoint signs them.
    audit.shutdown();
    Ok(())
}
