//! A real SoftHSM token in a private temp dir, made by `softhsm-config/init-token` (the same
//! script the README demo uses).
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, at `C_Initialize`, from the process environment, and may
//! be initialised only once per process: so a test that opens a token in-process calls
//! [`SoftHsm::use_in_this_process`] first, and runs under cargo-nextest (one process per test).
//! Child processes get the variable through `Command::env` instead ([`SoftHsm::env`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use hsm_shim::pkcs11::{Pkcs11Config, SOFTHSM_MODULE};
use hsm_shim::uri::Pkcs11Uri;
use hsm_shim::Pin;
use tempfile::TempDir;

use crate::workspace_root;

/// A SoftHSM token that lives as long as this value.
#[derive(Debug)]
pub struct SoftHsm {
    dir: TempDir,
    conf: PathBuf,
    label: String,
}

impl SoftHsm {
    /// Create and initialise a token named `label` with a random user PIN.
    pub fn new(label: &str) -> Self {
        assert!(
            Path::new(SOFTHSM_MODULE).exists(),
            "SoftHSM is not installed ({SOFTHSM_MODULE} missing): apt-get install softhsm2"
        );
        let dir = tempfile::Builder::new()
            .prefix("keyward-softhsm-")
            .tempdir()
            .unwrap();
        let script = workspace_root().join("softhsm-config/init-token");
        let out = crate::run(Command::new(&script).arg(dir.path()).arg(label));
        let conf = PathBuf::from(out.trim());
        assert!(
            conf.is_file(),
            "init-token printed {out:?}, not a config path"
        );
        Self {
            dir,
            conf,
            label: label.to_owned(),
        }
    }

    /// Path of this token's `softhsm2.conf`.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The token label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The temp dir holding the config, the tokens and the PIN files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The directory SoftHSM keeps token objects in.
    pub fn token_dir(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }

    /// File holding the user PIN (mode 0600).
    pub fn pin_file(&self) -> PathBuf {
        self.dir.path().join("user-pin")
    }

    /// The user PIN.
    pub fn pin(&self) -> Pin {
        Pin::from_file(&self.pin_file()).unwrap()
    }

    /// The PKCS#11 URI naming this token.
    pub fn uri(&self) -> Pkcs11Uri {
        Pkcs11Uri {
            token: Some(self.label.clone()),
            ..Pkcs11Uri::default()
        }
    }

    /// The environment a child process needs to see this token.
    pub fn env(&self) -> (&'static str, &Path) {
        ("SOFTHSM2_CONF", &self.conf)
    }

    /// A device config for this token with its user PIN.
    pub fn config(&self) -> Pkcs11Config {
        Pkcs11Config::new(SOFTHSM_MODULE, self.uri(), Some(self.pin()))
    }

    /// Point this process's SoftHSM at this token's config. Call it before the first
    /// `Pkcs11Device::open` of the process.
    ///
    /// Setting an environment variable is only sound while no other thread reads the
    /// environment; under cargo-nextest each test is its own process whose only test thread is
    /// the caller, which this checks.
    pub fn use_in_this_process(&self) {
        assert_eq!(
            std::env::var("NEXTEST_EXECUTION_MODE").as_deref(),
            Ok("process-per-test"),
            "SoftHSM initialises once per process: run these tests with cargo nextest"
        );
        std::env::set_var("SOFTHSM2_CONF", &self.conf);
    }
}
