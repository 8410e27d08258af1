//! A real SoftHSM token in a private temp dir, made by `softhsm-config/init-token` (the same
//! script the README demo uses).
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, at `C_Initialize`, from the process environment, and may
//! be initialised only once per process: so a test that opens a token in-process calls
//! [`SoftHsm::use_in_this_process`] first, and runs under cargo-nextest (one process per test).
//! Child processes get the variable through `Command::env` instead ([`SoftHsm::env`]).
//!
//! [`SoftHsm::keypair_as_another_app`] and [`SoftHsm::objects`] go through OpenSC's
//! `pkcs11-tool`, a process of its own each time: what another application would do to the
//! token, and a view of it that no cache of ours can colour.

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

    /// `pkcs11-tool` on this token, logged in as the user.
    fn pkcs11_tool(&self) -> Command {
        // `pkcs11-tool` has no `--version` that exits 0: only check that it starts.
        assert!(
            Command::new("pkcs11-tool").arg("--help").output().is_ok(),
            "pkcs11-tool is not installed: apt-get install opensc"
        );
        let pin = std::fs::read_to_string(self.pin_file()).unwrap();
        let mut c = Command::new("pkcs11-tool");
        c.env("SOFTHSM2_CONF", &self.conf)
            .args(["--module", SOFTHSM_MODULE, "--token-label", &self.label])
            .args(["--login", "--pin", pin.trim()]);
        c
    }

    /// Make an ECDSA P-256 key pair on the token with `label` and `CKA_ID` `id` (hex), as any
    /// other application could.
    pub fn keypair_as_another_app(&self, label: &str, id: &str) {
        crate::run(self.pkcs11_tool().args([
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--label",
            label,
            "--id",
            id,
        ]));
    }

    /// Every object on the token (that the user sees), as `pkcs11-tool --list-objects` prints
    /// them.
    pub fn objects(&self) -> Vec<TokenObject> {
        let listing = crate::run(self.pkcs11_tool().arg("--list-objects"));
        let mut objects: Vec<TokenObject> = Vec::new();
        for line in listing.lines() {
            if !line.starts_with(char::is_whitespace) {
                let class = line.split(';').next().unwrap_or(line).trim().to_owned();
                objects.push(TokenObject {
                    class,
                    ..TokenObject::default()
                });
            } else if let (Some(last), Some((field, value))) =
                (objects.last_mut(), line.trim().split_once(':'))
            {
                match field {
                    "label" => last.label = value.trim().to_owned(),
                    "ID" => last.id = value.trim().to_owned(),
                    _ => {}
                }
            }
        }
        objects
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

/// One object on a token: class (`Private Key Object`, ...), `CKA_LABEL`, `CKA_ID` in hex.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokenObject {
    pub class: String,
    pub label: String,
    pub id: String,
}
