//! Types that hold secret material: [`SecretBytes`] and [`Pin`].
//!
//! Both zeroize on drop, have no `Clone`, no `Serialize` and a `Debug` that prints no content, so
//! a secret can only leave through [`SecretBytes::expose`] / [`Pin::expose`], whose callers say
//! why. Locking the pages in memory is the daemon's business (it owns the process); this crate
//! only makes sure nothing it hands out outlives its use.

use std::fmt;
use std::path::Path;

use zeroize::Zeroizing;

use crate::DeviceError;

/// Secret bytes (a vault master key, an unsealed value). Zeroized on drop.
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Take ownership of `bytes`; the vector is zeroized when this value drops.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The secret. Call it only where the bytes go straight into a device, a cipher or a
    /// zeroizing buffer.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes (not secret).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Zeroizing<Vec<u8>>> for SecretBytes {
    fn from(z: Zeroizing<Vec<u8>>) -> Self {
        Self(z)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes({} bytes, redacted)", self.0.len())
    }
}

/// A user PIN or TPM authorisation value. Zeroized on drop; never printed.
pub struct Pin(Zeroizing<String>);

impl Pin {
    /// Longest PIN accepted (PKCS#11 tokens allow less; a TPM auth value is at most 64 bytes).
    pub const MAX_LEN: usize = 64;

    /// A PIN from a string.
    ///
    /// # Errors
    /// [`DeviceError::InvalidArgument`] when empty, longer than [`Pin::MAX_LEN`] or containing a
    /// control character (a stray newline from a file is the usual cause; [`Pin::from_file`] strips
    /// one trailing newline).
    pub fn new(pin: impl Into<String>) -> Result<Self, DeviceError> {
        let pin = Zeroizing::new(pin.into());
        if pin.is_empty() || pin.len() > Self::MAX_LEN {
            return Err(DeviceError::InvalidArgument(format!(
                "a PIN is 1 to {} bytes, not {}",
                Self::MAX_LEN,
                pin.len()
            )));
        }
        if pin.chars().any(char::is_control) {
            return Err(DeviceError::InvalidArgument(
                "a PIN has no control characters".into(),
            ));
        }
        Ok(Self(pin))
    }

    /// Read a PIN from a file (a systemd credential, a root-only file), dropping one trailing
    /// `\n` or `\r\n`.
    ///
    /// The file must be closed to others and not writable by its group: a PIN anyone can read
    /// is no PIN, and one anyone can write lets them burn the token's retries. The mode is
    /// checked on the opened file, so a swap between check and read changes nothing.
    ///
    /// # Errors
    /// [`DeviceError::Config`] when the file can't be read or is open to others, or as
    /// [`Pin::new`].
    pub fn from_file(path: &Path) -> Result<Self, DeviceError> {
        use std::io::Read as _;
        use std::os::unix::fs::PermissionsExt as _;

        let unreadable = |e: std::io::Error| {
            DeviceError::Config(format!("cannot read PIN file {}: {e}", path.display()))
        };
        let mut file = std::fs::File::open(path).map_err(unreadable)?;
        let mode = file.metadata().map_err(unreadable)?.permissions().mode() & 0o777;
        if mode & 0o027 != 0 {
            return Err(DeviceError::Config(format!(
                "PIN file {} has mode {mode:04o}: it must not be readable by others or writable \
                 by its group (chmod 600)",
                path.display()
            )));
        }
        let mut raw = Zeroizing::new(Vec::with_capacity(Self::MAX_LEN + 2));
        // A PIN is short: read one byte more than any valid file so an oversized one is
        // refused without reading it whole.
        file.by_ref()
            .take(Self::MAX_LEN as u64 + 3)
            .read_to_end(&mut raw)
            .map_err(unreadable)?;
        let mut end = raw.len();
        if raw[..end].ends_with(b"\n") {
            end -= 1;
            if raw[..end].ends_with(b"\r") {
                end -= 1;
            }
        }
        let text = std::str::from_utf8(&raw[..end]).map_err(|_| {
            DeviceError::InvalidArgument(format!("PIN file {} is not UTF-8", path.display()))
        })?;
        Self::new(text)
    }

    /// The PIN. Call it only to hand it to the device.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(redacted)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_content() {
        let s = SecretBytes::new(b"hunter2-marker".to_vec());
        let p = Pin::new("4711-marker").unwrap();
        let shown = format!("{s:?} {p:?}");
        assert!(!shown.contains("marker"), "{shown}");
        assert!(shown.contains("14 bytes"));
    }

    #[test]
    fn pin_rules() {
        assert!(Pin::new("").is_err());
        assert!(Pin::new("12\n34").is_err());
        assert!(Pin::new("x".repeat(65)).is_err());
        assert_eq!(Pin::new("1234").unwrap().expose(), "1234");
    }

    #[test]
    fn pin_file_drops_one_newline() {
        let dir = std::env::temp_dir().join(format!("keyward-pin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pin");
        std::fs::write(&f, "1234\r\n").unwrap();
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert_eq!(Pin::from_file(&f).unwrap().expose(), "1234");
        std::fs::write(&f, "1234\n\n").unwrap();
        assert!(
            Pin::from_file(&f).is_err(),
            "two newlines is a malformed PIN file"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pin_file_open_to_others_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("keyward-pin-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pin");
        std::fs::write(&f, "1234\n").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, true),
            (0o644, false),
            (0o660, false),
            (0o602, false),
        ] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = Pin::from_file(&f);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains("chmod 600"), "{e}");
            }
        }
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&f, "9".repeat(200)).unwrap();
        assert!(Pin::from_file(&f).is_err(), "an oversized PIN file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
