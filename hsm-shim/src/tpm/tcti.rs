//! [`Tcti`]: which TPM to talk to, parsed and validated here rather than by tss-esapi.
//!
//! tss-esapi 7.7 parses TCTI strings leniently: it ignores keys it does not know (so
//! `swtpm:path=/run/swtpm.sock` silently becomes `localhost:2321`, possibly someone else's TPM) and
//! fills in a default port when none is given. We accept only what we can honour, then build the
//! `TctiNameConf` from the validated values and check that tss-esapi renders it back exactly as we
//! meant it. This module owns that translation; it never opens a connection.

use std::ffi::CString;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tss_esapi::tcti_ldr::{DeviceConfig, NetworkTPMConfig, TctiNameConf};

use crate::{DeviceError, Result};

/// The kernel's resource-managed TPM device. `/dev/tpm0` (tss-esapi's default) allows one user at
/// a time and leaks handles across processes; the resource manager does not.
pub const DEFAULT_DEVICE: &str = "/dev/tpmrm0";

/// How to reach a TPM.
///
/// Textual forms (the `FromStr`/`Display` pair round-trips):
/// - `device` or `device:/dev/tpmrm0`: a character device (the default: `/dev/tpmrm0`);
/// - `swtpm:host=127.0.0.1,port=2321`: an swtpm over TCP (`host` defaults to `127.0.0.1`,
///   `port` is required);
/// - `mssim:host=…,port=…`: the Microsoft simulator protocol, same keys.
///
/// Unix-socket swtpm (`swtpm:path=…`) is rejected: tss-esapi 7.7 ignores `path` and would
/// connect to `localhost:2321` instead.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Tcti {
    /// A TPM character device.
    Device {
        /// Absolute path of the device node.
        path: PathBuf,
    },
    /// swtpm's TCP server (command port `port`, control port `port + 1`).
    Swtpm {
        /// IP address or DNS host name.
        host: String,
        /// Command port.
        port: u16,
    },
    /// A simulator speaking the MSSIM protocol (command port `port`, platform port `port + 1`).
    Mssim {
        /// IP address or DNS host name.
        host: String,
        /// Command port.
        port: u16,
    },
}

impl Default for Tcti {
    fn default() -> Self {
        Self::Device {
            path: PathBuf::from(DEFAULT_DEVICE),
        }
    }
}

fn bad(tcti: &str, why: impl fmt::Display) -> DeviceError {
    DeviceError::Config(format!("TCTI {tcti:?}: {why}"))
}

impl FromStr for Tcti {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self> {
        let (name, conf) = match s.split_once(':') {
            Some((name, conf)) => (name, Some(conf)),
            None => (s, None),
        };
        match name {
            "device" => parse_device(s, conf),
            "swtpm" | "mssim" => {
                let conf = conf.ok_or_else(|| {
                    bad(
                        s,
                        "needs host and port, e.g. swtpm:host=127.0.0.1,port=2321",
                    )
                })?;
                let (host, port) = parse_network(s, conf)?;
                Ok(if name == "swtpm" {
                    Self::Swtpm { host, port }
                } else {
                    Self::Mssim { host, port }
                })
            }
            "tabrmd" => Err(bad(
                s,
                "the tpm2-abrmd broker is not supported; use device:/dev/tpmrm0 (the kernel's \
                 resource manager)",
            )),
            _ => Err(bad(
                s,
                "unknown TCTI; expected device[:PATH], swtpm:host=H,port=P or mssim:…",
            )),
        }
    }
}

fn parse_device(s: &str, conf: Option<&str>) -> Result<Tcti> {
    let Some(path) = conf else {
        return Ok(Tcti::default());
    };
    if path.is_empty() {
        // tss-esapi would read an empty path as /dev/tpm0, not our default: make it explicit.
        return Err(bad(
            s,
            "empty device path; write `device` or `device:/dev/tpmrm0`",
        ));
    }
    if !path.starts_with('/') {
        return Err(bad(s, "the device path must be absolute"));
    }
    if path.contains(['\0', ',', '=']) || path.chars().any(char::is_whitespace) {
        return Err(bad(
            s,
            "the device path has characters a TCTI config cannot carry",
        ));
    }
    Ok(Tcti::Device {
        path: PathBuf::from(path),
    })
}

fn parse_network(s: &str, conf: &str) -> Result<(String, u16)> {
    let mut host: Option<String> = None;
    let mut port: Option<u16> = None;
    for item in conf.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| bad(s, format!("{item:?} is not key=value")))?;
        match key {
            "host" => {
                if host.is_some() {
                    return Err(bad(s, "host given twice"));
                }
                validate_host(s, value)?;
                host = Some(value.to_owned());
            }
            "port" => {
                if port.is_some() {
                    return Err(bad(s, "port given twice"));
                }
                let p: u16 = value.parse().map_err(|_| {
                    bad(s, format!("port {value:?} is not a number from 1 to 65534"))
                })?;
                // The simulator protocols use `port + 1` as well, so 65535 cannot work.
                if p == 0 || p == u16::MAX {
                    return Err(bad(s, format!("port {p} is out of range 1..=65534")));
                }
                port = Some(p);
            }
            "path" => {
                return Err(bad(
                    s,
                    "swtpm over a Unix socket is not supported: tss-esapi 7.7 silently ignores \
                     `path` and would connect to localhost:2321 (possibly another TPM); run swtpm \
                     with `--server type=tcp,port=P` and use swtpm:host=127.0.0.1,port=P",
                ));
            }
            other => return Err(bad(s, format!("unknown key {other:?}; only host and port"))),
        }
    }
    let port = port.ok_or_else(|| {
        bad(
            s,
            "port is required (tss-esapi would otherwise pick 2321, possibly another TPM)",
        )
    })?;
    Ok((host.unwrap_or_else(|| "127.0.0.1".to_owned()), port))
}

/// An IP address, or a DNS name by RFC 1123 rules (what tss-esapi's own check accepts).
fn validate_host(s: &str, host: &str) -> Result<()> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(bad(
            s,
            format!("host {host:?} is neither an IP address nor a host name"),
        ));
    }
    Ok(())
}

impl fmt::Display for Tcti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Device { path } => write!(f, "device:{}", path.display()),
            Self::Swtpm { host, port } => write!(f, "swtpm:host={host},port={port}"),
            Self::Mssim { host, port } => write!(f, "mssim:host={host},port={port}"),
        }
    }
}

impl Tcti {
    /// The tss-esapi configuration for this TCTI.
    ///
    /// tss-esapi's config structs have private fields and can only be made by parsing, so we hand
    /// it the canonical form of values we validated, then render the result back and insist it is
    /// what we meant: a lenient parse can never redirect us to another TPM.
    ///
    /// # Errors
    /// [`DeviceError::Config`] when tss-esapi reads the configuration differently.
    pub(crate) fn name_conf(&self) -> Result<TctiNameConf> {
        let conf = match self {
            Self::Device { path } => {
                let path = path
                    .to_str()
                    .ok_or_else(|| bad(&self.to_string(), "path not UTF-8"))?;
                TctiNameConf::Device(
                    DeviceConfig::from_str(path).map_err(|e| bad(&self.to_string(), e))?,
                )
            }
            Self::Swtpm { host, port } | Self::Mssim { host, port } => {
                let net = NetworkTPMConfig::from_str(&format!("host={host},port={port}"))
                    .map_err(|e| bad(&self.to_string(), e))?;
                if matches!(self, Self::Swtpm { .. }) {
                    TctiNameConf::Swtpm(net)
                } else {
                    TctiNameConf::Mssim(net)
                }
            }
        };
        let rendered = CString::try_from(conf.clone()).map_err(|e| bad(&self.to_string(), e))?;
        let expected = self.to_string();
        if rendered.as_bytes() != expected.as_bytes() {
            return Err(bad(
                &expected,
                format!("tss-esapi would use {rendered:?} instead; refusing"),
            ));
        }
        Ok(conf)
    }
}

impl Serialize for Tcti {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Tcti {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_err(s: &str) -> String {
        match s.parse::<Tcti>() {
            Err(DeviceError::Config(m)) => m,
            other => panic!("{s:?} gave {other:?}, want a Config error"),
        }
    }

    #[test]
    fn device_forms() {
        assert_eq!("device".parse::<Tcti>().unwrap(), Tcti::default());
        assert_eq!(Tcti::default().to_string(), "device:/dev/tpmrm0");
        assert_eq!(
            "device:/dev/tpm0".parse::<Tcti>().unwrap(),
            Tcti::Device {
                path: "/dev/tpm0".into()
            }
        );
        config_err("device:");
        config_err("device:dev/tpm0");
        config_err("device:/dev/tpm0,x=1");
    }

    #[test]
    fn swtpm_and_mssim_forms() {
        let t: Tcti = "swtpm:host=127.0.0.1,port=2321".parse().unwrap();
        assert_eq!(
            t,
            Tcti::Swtpm {
                host: "127.0.0.1".into(),
                port: 2321
            }
        );
        assert_eq!(t.to_string(), "swtpm:host=127.0.0.1,port=2321");
        let t: Tcti = "swtpm:port=4000,host=tpm.example".parse().unwrap();
        assert_eq!(
            t,
            Tcti::Swtpm {
                host: "tpm.example".into(),
                port: 4000
            }
        );
        let t: Tcti = "mssim:port=4000".parse().unwrap();
        assert_eq!(
            t,
            Tcti::Mssim {
                host: "127.0.0.1".into(),
                port: 4000
            }
        );
        let t: Tcti = "swtpm:host=::1,port=5".parse().unwrap();
        assert_eq!(
            t,
            Tcti::Swtpm {
                host: "::1".into(),
                port: 5
            }
        );
    }

    #[test]
    fn rejects_what_tss_esapi_would_misread() {
        assert!(config_err("swtpm:path=/run/swtpm.sock").contains("silently ignores"));
        assert!(config_err("swtpm:host=127.0.0.1,port=2321,path=/x").contains("Unix socket"));
        assert!(config_err("swtpm").contains("host and port"));
        assert!(config_err("swtpm:host=127.0.0.1").contains("port is required"));
        assert!(config_err("swtpm:host=127.0.0.1,port=").contains("not a number"));
        assert!(config_err("swtpm:port=70000").contains("not a number"));
        assert!(config_err("swtpm:port=0").contains("out of range"));
        assert!(config_err("swtpm:port=65535").contains("out of range"));
        assert!(config_err("swtpm:port=2321,port=2322").contains("twice"));
        assert!(config_err("swtpm:port=2321,colour=red").contains("unknown key"));
        assert!(config_err("swtpm:port=2321,").contains("key=value"));
        assert!(config_err("swtpm:host=-bad,port=1").contains("host"));
        assert!(config_err("swtpm:host=a@b,port=1").contains("host"));
        assert!(config_err("swtpm:host=,port=1").contains("host"));
        assert!(config_err("tabrmd").contains("not supported"));
        assert!(config_err("libtpms").contains("unknown TCTI"));
        config_err("");
        config_err(" device");
    }

    #[test]
    fn name_conf_renders_exactly_what_we_validated() {
        for s in [
            "device:/dev/tpmrm0",
            "swtpm:host=127.0.0.1,port=2321",
            "mssim:host=localhost,port=40000",
            "swtpm:host=::1,port=2321",
        ] {
            let t: Tcti = s.parse().unwrap();
            let conf = t.name_conf().unwrap();
            assert_eq!(CString::try_from(conf).unwrap().to_str().unwrap(), s);
        }
    }

    #[test]
    fn serde_uses_the_string_form() {
        let t: Tcti = serde_json::from_str("\"swtpm:host=127.0.0.1,port=9\"").unwrap();
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            "\"swtpm:host=127.0.0.1,port=9\""
        );
        assert!(serde_json::from_str::<Tcti>("\"swtpm:path=/x\"").is_err());
    }
}
