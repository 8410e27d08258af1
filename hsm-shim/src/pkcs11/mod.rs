//! PKCS#11 backend (cryptoki): a token named by a PKCS#11 URI, one logged-in session owned by
//! one thread.
//!
//! What lives where:
//! - `mod.rs`: configuration, loading the module once per process, finding the token, the session
//!   and login, [`Device`];
//! - `error.rs`: the one mapping from `CKR_*` codes to [`DeviceError`];
//! - `seal.rs`: [`crate::Sealer`] with a token-resident AES-256 key (GCM) or RSA key pair (OAEP);
//! - `keys.rs` and `sign.rs`: [`crate::Signer`];
//! - `pool.rs`: [`crate::SharedSigner`], sessions on which callers sign in parallel.
//!
//! Objects are found by `CKA_ID` (random, made by the token's RNG); handles are cached for the
//! session's life because a `C_FindObjects*` round trip per signature would cost more than the
//! signature itself on a fast token.

mod error;
mod keys;
mod pool;
mod seal;
mod sign;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use crate::uri::{Pkcs11Uri, TokenFields};
use crate::{Device, DeviceError, DeviceInfo, DeviceKind, Pin, Result};

pub use error::map_error;

/// Debian's SoftHSM module, the development and test token.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// How [`crate::Sealer::seal`] protects a secret on this token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SealMode {
    /// AES-GCM when the token has it, else RSA-OAEP.
    #[default]
    Auto,
    /// AES-256-GCM with a token-resident secret key.
    AesGcm,
    /// RSA-OAEP (SHA-256) with a token-resident RSA-3072 key pair: smart cards without AES.
    RsaOaep,
}

/// Where the token is and how to log in.
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (shared library).
    pub module: PathBuf,
    /// The token: a URI that names it by `token`, `serial`, `manufacturer` and/or `model`.
    pub token: Pkcs11Uri,
    /// The user PIN. `None` for tokens that need no login.
    pub pin: Option<Pin>,
    /// `CKA_LABEL` of the sealing key (created on first seal when absent).
    pub seal_key_label: String,
    /// How secrets are sealed.
    pub seal_mode: SealMode,
}

impl Pkcs11Config {
    /// A config for `module` and `token` with defaults for the rest.
    pub fn new(module: impl Into<PathBuf>, token: Pkcs11Uri, pin: Option<Pin>) -> Self {
        Self {
            module: module.into(),
            token,
            pin,
            seal_key_label: "keyward-seal".into(),
            seal_mode: SealMode::Auto,
        }
    }
}

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token", &self.token.to_string())
            .field("pin", &self.pin.as_ref().map(|_| "(set)"))
            .field("seal_key_label", &self.seal_key_label)
            .field("seal_mode", &self.seal_mode)
            .finish()
    }
}

/// A logged-in session on one token. Owned by one thread (`Session` is `Send`, not `Sync`).
pub struct Pkcs11Device {
    ctx: Pkcs11,
    config: Pkcs11Config,
    slot: Slot,
    session: Session,
    info: DeviceInfo,
    /// `(class, CKA_ID)` → handle, valid for this session.
    handles: Handles,
    /// Counts this device among the module's users (see `restart_module`).
    _user: Arc<()>,
}

impl fmt::Debug for Pkcs11Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Device")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// A loaded module and the devices using it.
struct Module {
    ctx: Pkcs11,
    /// One clone per open [`Pkcs11Device`] (plus this one): the module may be restarted only
    /// while no device has sessions on it.
    users: Arc<()>,
}

/// One `Pkcs11` per module path for the whole process: `C_Initialize` may run once per process
/// (SoftHSM crashes on a second one without a `C_Finalize` first), and every device on that
/// module shares it. The map's lock is held while a device finds its token and logs in, so
/// that a restart ([`restart_module`]) never runs under another device's enumeration.
fn modules() -> std::sync::MutexGuard<'static, HashMap<PathBuf, Module>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Module>>> = OnceLock::new();
    MODULES
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The module at `path`, loaded and initialised on first use; true when this call initialised
/// it.
fn loaded<'m>(
    modules: &'m mut HashMap<PathBuf, Module>,
    path: &Path,
) -> Result<(&'m Module, bool)> {
    let fresh = !modules.contains_key(path);
    if fresh {
        let ctx = load_module(path)?;
        modules.insert(
            path.to_path_buf(),
            Module {
                ctx,
                users: Arc::new(()),
            },
        );
    }
    let module = modules.get(path).ok_or_else(|| DeviceError::Backend {
        op: "C_Initialize",
        detail: "the module vanished from the process's table".into(),
    })?;
    Ok((module, fresh))
}

fn load_module(path: &Path) -> Result<Pkcs11> {
    if path.to_string_lossy().contains("softhsm") && std::env::var_os("SOFTHSM2_CONF").is_none() {
        // SoftHSM would silently use /etc/softhsm/softhsm2.conf and its system-wide tokens.
        return Err(DeviceError::Config(format!(
            "{} is SoftHSM and SOFTHSM2_CONF is not set: refusing to fall back to the \
             system-wide /etc/softhsm/softhsm2.conf; name the config explicitly",
            path.display()
        )));
    }
    let ctx = Pkcs11::new(path).map_err(|e| {
        DeviceError::Config(format!(
            "cannot load PKCS#11 module {}: {e}",
            path.display()
        ))
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(map_error("C_Initialize", e)),
    }
    tracing::info!(
        module = %path.display(),
        softhsm2_conf = ?std::env::var_os("SOFTHSM2_CONF"),
        "PKCS#11 module initialised"
    );
    Ok(ctx)
}

/// `C_Finalize` and `C_Initialize` the module at `path` again, when no device has sessions on
/// it; false when some device does (its sessions would die under it).
///
/// Why: a module may read its token list only at `C_Initialize`, and keep a token that vanished
/// broken until then. SoftHSM does both: it scans its token directory at `C_Initialize` only,
/// and once the directory disappeared the token answers `CKR_GENERAL_ERROR` for good, even after
/// the files are back. Restarting the module is what lets a reopen find the token again.
fn restart_module(modules: &mut HashMap<PathBuf, Module>, path: &Path) -> Result<bool> {
    let Some(module) = modules.get(path) else {
        return Ok(false);
    };
    if Arc::strong_count(&module.users) > 1 {
        return Ok(false);
    }
    let ctx = module.ctx.clone();
    if let Err(e) = ctx.clone().finalize() {
        tracing::debug!(module = %path.display(), error = ?e, "C_Finalize before a restart failed");
    }
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            tracing::info!(module = %path.display(), "PKCS#11 module restarted to look for the token again");
            Ok(true)
        }
        Err(e) => {
            // Finalized and not initialised: forget it, so the next open loads it afresh.
            modules.remove(path);
            Err(map_error("C_Initialize", e))
        }
    }
}

impl Pkcs11Device {
    /// Load the module (once per process), find the one token the URI names, open a read-write
    /// session and log in.
    ///
    /// # Errors
    /// [`DeviceError::Config`] for a URI that names no token or several, a module that does not
    /// load; [`DeviceError::PinIncorrect`] / [`DeviceError::PinLocked`] from login (a failed PIN
    /// is never retried here: each try burns one of the token's retries).
    pub fn open(config: Pkcs11Config) -> Result<Self> {
        if !config.token.names_token() {
            return Err(DeviceError::Config(format!(
                "the token URI {} must name a token (token=, serial=, manufacturer= or model=)",
                config.token
            )));
        }
        let mut modules = modules();
        let (module, fresh) = loaded(&mut modules, &config.module)?;
        let found = match find_token(&module.ctx, &config.token) {
            Ok(found) => found,
            // A module initialised before the token (re)appeared may not see it: start the
            // module afresh and look once more (see `restart_module`).
            Err(e) if !fresh => {
                if !restart_module(&mut modules, &config.module)? {
                    return Err(e);
                }
                let (module, _) = loaded(&mut modules, &config.module)?;
                find_token(&module.ctx, &config.token)?
            }
            Err(e) => return Err(e),
        };
        let (slot, info) = found;
        let (module, _) = loaded(&mut modules, &config.module)?;
        let session = open_session(&module.ctx, slot, config.pin.as_ref())?;
        let (ctx, user) = (module.ctx.clone(), Arc::clone(&module.users));
        drop(modules);
        tracing::debug!(token = %info.label, serial = %info.serial, "PKCS#11 session open");
        Ok(Self {
            ctx,
            config,
            slot,
            session,
            info,
            handles: Handles::default(),
            _user: user,
        })
    }

    /// Find the token again and open a new session, after [`DeviceError::DeviceGone`].
    ///
    /// # Errors
    /// As [`Pkcs11Device::open`].
    pub fn reopen(&mut self) -> Result<()> {
        let (slot, info) = find_token(&self.ctx, &self.config.token)?;
        self.session = open_session(&self.ctx, slot, self.config.pin.as_ref())?;
        self.slot = slot;
        self.info = info;
        self.handles.clear();
        Ok(())
    }

    /// A new pool of sessions beside this device's own, for [`crate::Signer::shared_signer`]. It
    /// keeps as many idle sessions as the machine has CPUs: more could not sign at once.
    fn session_pool(&self) -> Arc<pool::SessionPool> {
        let keep = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        Arc::new(pool::SessionPool::new(
            self.ctx.clone(),
            self.slot,
            keep,
            Arc::clone(&self._user),
        ))
    }

    /// The configuration this device was opened with.
    pub fn config(&self) -> &Pkcs11Config {
        &self.config
    }

    /// `count` random bytes from the token's RNG.
    fn random(&self, count: u32) -> Result<Vec<u8>> {
        self.session
            .generate_random_vec(count)
            .map_err(|e| map_error("C_GenerateRandom", e))
    }

    /// The object of `class` with `CKA_ID == id`, from the cache or the token.
    fn find(&mut self, class: cryptoki::object::ObjectClass, id: &[u8]) -> Result<ObjectHandle> {
        self.handles.find(&self.session, class, id)
    }
}

/// Object handles found by `(class, CKA_ID)`, valid for the session that found them.
#[derive(Default)]
struct Handles(HashMap<(u64, Vec<u8>), ObjectHandle>);

impl Handles {
    /// The object of `class` with `CKA_ID == id`, from the cache or else the token.
    fn find(
        &mut self,
        session: &Session,
        class: cryptoki::object::ObjectClass,
        id: &[u8],
    ) -> Result<ObjectHandle> {
        use cryptoki::object::Attribute;
        let key = (u64::from(class), id.to_vec());
        if let Some(h) = self.0.get(&key) {
            return Ok(*h);
        }
        let found = session
            .find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])
            .map_err(|e| map_error("C_FindObjects", e))?;
        match found.as_slice() {
            [h] => {
                self.0.insert(key, *h);
                Ok(*h)
            }
            [] => Err(DeviceError::NotFound(format!(
                "{class} with CKA_ID {}",
                base16ct::lower::encode_string(id)
            ))),
            _ => Err(DeviceError::Backend {
                op: "C_FindObjects",
                detail: format!(
                    "{} objects of class {class} share CKA_ID {}",
                    found.len(),
                    base16ct::lower::encode_string(id)
                ),
            }),
        }
    }

    /// Forget every handle of `CKA_ID == id` (the object may be gone: a cached handle can go
    /// stale when the object is destroyed elsewhere).
    fn forget(&mut self, id: &[u8]) {
        self.0.retain(|(_, cached), _| cached != id);
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

fn find_token(ctx: &Pkcs11, uri: &Pkcs11Uri) -> Result<(Slot, DeviceInfo)> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| map_error("C_GetSlotList", e))?;
    let mut seen = Vec::new();
    let mut matches = Vec::new();
    for slot in slots {
        let t = ctx
            .get_token_info(slot)
            .map_err(|e| map_error("C_GetTokenInfo", e))?;
        let info = DeviceInfo {
            kind: DeviceKind::Pkcs11,
            manufacturer: t.manufacturer_id().trim_end().to_owned(),
            model: t.model().trim_end().to_owned(),
            serial: t.serial_number().trim_end().to_owned(),
            label: t.label().trim_end().to_owned(),
            algorithms: Vec::new(),
        };
        let fields = TokenFields {
            label: &info.label,
            manufacturer: &info.manufacturer,
            serial: &info.serial,
            model: &info.model,
        };
        if uri.matches_token(&fields) {
            matches.push((slot, info));
        } else {
            seen.push(format!("{:?} (serial {})", info.label, info.serial));
        }
    }
    match matches.len() {
        1 => {
            let (slot, mut info) = matches.remove(0);
            info.algorithms = keys::algorithms(ctx, slot);
            Ok((slot, info))
        }
        0 => Err(DeviceError::Config(format!(
            "no token matches {uri}; tokens present: {}",
            if seen.is_empty() {
                "none".to_owned()
            } else {
                seen.join(", ")
            }
        ))),
        n => Err(DeviceError::Config(format!(
            "{n} tokens match {uri}; add serial= to pick one"
        ))),
    }
}

fn open_session(ctx: &Pkcs11, slot: Slot, pin: Option<&Pin>) -> Result<Session> {
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| map_error("C_OpenSession", e))?;
    if let Some(pin) = pin {
        let auth = AuthPin::new(pin.expose().into());
        match session.login(UserType::User, Some(&auth)) {
            // Another session of this process is logged in already: login state is per token.
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                return Err(DeviceError::PinIncorrect {
                    retries_left: pin_retries(ctx, slot),
                })
            }
            Err(e) => return Err(map_error("C_Login", e)),
        }
    }
    Ok(session)
}

/// What the token admits about the retries left: PKCS#11 has only "count low" and "final try".
fn pin_retries(ctx: &Pkcs11, slot: Slot) -> Option<u32> {
    let t = ctx.get_token_info(slot).ok()?;
    if t.user_pin_final_try() {
        Some(1)
    } else {
        None
    }
}

impl Device for Pkcs11Device {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn ping(&mut self) -> Result<()> {
        let t = self
            .ctx
            .get_token_info(self.slot)
            .map_err(|e| map_error("C_GetTokenInfo", e))?;
        if t.user_pin_locked() {
            return Err(DeviceError::PinLocked);
        }
        self.session
            .get_session_info()
            .map_err(|e| map_error("C_GetSessionInfo", e))?;
        Ok(())
    }
}
