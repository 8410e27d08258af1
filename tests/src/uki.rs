//! Unified kernel images as PCR 11 sees them, signed by systemd's own `systemd-measure sign`
//! (systemd 252: `/usr/lib/systemd/systemd-measure`), and booted into an swtpm by extending PCR
//! 11 the way systemd-stub does: for the tests and the benchmark of signed PCR policies.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::run;
use crate::swtpm::Swtpm;

/// Debian 12 ships it in the `systemd` package.
pub const MEASURE: &str = "/usr/lib/systemd/systemd-measure";

/// The boot phase words systemd measures into PCR 11 on the way to a running system
/// (`enter-initrd`, `leave-initrd`, `sysinit`, `ready`): the last of the phases that
/// `systemd-measure sign` signs by default.
pub const PHASES: [&str; 4] = ["enter-initrd", "leave-initrd", "sysinit", "ready"];

/// A unified kernel image, as far as PCR 11 sees it: its `.linux` and `.osrel` sections.
#[derive(Debug)]
pub struct Uki {
    linux: PathBuf,
    osrel: PathBuf,
}

impl Uki {
    /// Section files for an image whose kernel says `kernel`, in `dir`.
    ///
    /// # Panics
    /// When the files can't be written.
    pub fn new(dir: &Path, kernel: &str) -> Uki {
        let linux = dir.join(format!("{kernel}.linux"));
        let osrel = dir.join(format!("{kernel}.osrel"));
        std::fs::write(&linux, format!("kernel image {kernel}\n")).unwrap();
        std::fs::write(&osrel, "ID=debian\nVERSION_ID=12\n").unwrap();
        Uki { linux, osrel }
    }

    /// What PCR 11 is extended with from power-on to a running system, in order: by
    /// systemd-stub each section's name (with its NUL) and then its contents, by systemd the
    /// boot phase words (`systemd-pcrphase`).
    fn measurements(&self) -> Vec<[u8; 32]> {
        let mut m = Vec::new();
        for (section, file) in [(".linux", &self.linux), (".osrel", &self.osrel)] {
            m.push(Sha256::digest(format!("{section}\0").as_bytes()).into());
            m.push(Sha256::digest(std::fs::read(file).unwrap()).into());
        }
        for phase in PHASES {
            m.push(Sha256::digest(phase.as_bytes()).into());
        }
        m
    }

    /// `systemd-measure sign` of this image (sha256 bank, systemd's default boot phases, one
    /// entry each) with `key` (private, public PEM), the JSON written to `out` and returned.
    /// systemd 252 computes the policy digests in a TPM trial session, on `swtpm` (nothing else
    /// may be talking to it).
    ///
    /// # Panics
    /// When `systemd-measure` is missing or fails.
    pub fn sign(&self, swtpm: &Swtpm, key: &(PathBuf, PathBuf), out: &Path) -> serde_json::Value {
        assert!(
            Path::new(MEASURE).exists(),
            "{MEASURE} is missing: it comes with systemd (apt-get install -y systemd)"
        );
        let json = run(Command::new(MEASURE)
            .arg("sign")
            .arg(format!("--linux={}", self.linux.display()))
            .arg(format!("--osrel={}", self.osrel.display()))
            .arg("--bank=sha256")
            .arg(format!("--private-key={}", key.0.display()))
            .arg(format!("--public-key={}", key.1.display()))
            .arg(format!("--tpm2-device={}", swtpm.tcti())));
        std::fs::write(out, &json).unwrap();
        serde_json::from_str(&json).unwrap()
    }

    /// Boot this image to a running system: reset the TPM (PCRs back to zero, like a reboot)
    /// and extend PCR 11 as systemd-stub and systemd would. Nothing else may be talking to
    /// `swtpm`.
    ///
    /// # Panics
    /// When swtpm does not come back or `tpm2_pcrextend` fails.
    pub fn boot(&self, swtpm: &mut Swtpm) {
        swtpm.restart();
        for digest in self.measurements() {
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            run(Command::new("tpm2_pcrextend")
                .arg(format!("11:sha256={hex}"))
                .env("TPM2TOOLS_TCTI", swtpm.tcti()));
        }
    }
}

/// An RSA-2048 key pair made by openssl in `dir`: (private PEM, public PEM).
///
/// # Panics
/// When openssl fails.
pub fn keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{name}.key.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    run(Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private));
    run(Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public));
    (private, public)
}
