//! TPM 2.0 backend (tss-esapi 7.7): [`TpmDevice`] owns one ESAPI context and the storage root key
//! (SRK) for the device's life, and implements [`Device`], [`Sealer`](crate::Sealer)
//! (`seal.rs`) and [`Signer`](crate::Signer) (`sign.rs`) on it.
//!
//! The TPM keeps nothing of ours: the SRK is re-created from a fixed template on every open
//! (`template.rs`), and everything we make under it comes back as public + private blobs the
//! daemon stores. Connection strings are validated in `tcti.rs`; every TPM error is mapped in
//! `error.rs`; sessions live in `session.rs`.
//!
//! An ESAPI context must never be shared between threads, and a TPM has very few object and
//! session slots (swtpm: 3 each), so the device is `&mut self` throughout, holds at most the SRK,
//! one cached signing key and, during a call, one more object and one session.

mod banks;
mod certify;
mod counter;
mod error;
mod seal;
mod session;
mod sign;
mod signed;
mod tcti;
/// The object templates (public so a benchmark's raw baseline creates the very same objects).
pub mod template;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tss_esapi::constants::{CapabilityType, PropertyTag};
use tss_esapi::handles::KeyHandle as TpmKey;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{CapabilityData, Private, Public, PublicParameters};
use tss_esapi::traits::UnMarshall;
use tss_esapi::Context;

pub use banks::PcrBank;
pub use signed::{fingerprint, signed_pcrs, DEFAULT_SIGNATURE_FILES, DEFAULT_SIGNED_PCRS};
pub use tcti::{Tcti, DEFAULT_DEVICE};

use error::{map, Op};
use session::flush_quietly;

use crate::{Device, DeviceError, DeviceInfo, DeviceKind, KeyAlgorithm, Result};

/// How to open a TPM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmConfig {
    /// Which TPM (default `device:/dev/tpmrm0`).
    #[serde(default)]
    pub tcti: Tcti,
    /// PCRs of the sha256 bank that seals bind to when the caller doesn't say (default `[7]`,
    /// the Secure Boot policy: stable across kernel updates, changed by a different boot chain).
    #[serde(default = "default_pcrs")]
    pub pcrs: Vec<u8>,
    /// The signature file of signed PCR policies (`systemd-measure sign` JSON) that unseals
    /// read. `None` looks where systemd does: [`DEFAULT_SIGNATURE_FILES`], first found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcr_signature: Option<PathBuf>,
}

fn default_pcrs() -> Vec<u8> {
    vec![7]
}

impl TpmConfig {
    /// The TPM `tcti` names, sealing to the default PCRs (`[7]`).
    pub fn new(tcti: Tcti) -> Self {
        Self {
            tcti,
            pcrs: default_pcrs(),
            pcr_signature: None,
        }
    }
}

impl Default for TpmConfig {
    fn default() -> Self {
        Self::new(Tcti::default())
    }
}

/// A signing key we loaded and kept loaded, so repeated signs with one key are one round trip.
#[derive(Debug)]
struct CachedKey {
    public: Vec<u8>,
    private: Vec<u8>,
    handle: TpmKey,
}

/// An open TPM: one ESAPI context and the SRK handle, owned by one thread.
#[derive(Debug)]
pub struct TpmDevice {
    ctx: Context,
    srk: TpmKey,
    /// Canonical (sorted, checked) default PCR list.
    pcrs: Vec<u8>,
    /// Where signed PCR policies' signatures are read, in order.
    signature_files: Vec<PathBuf>,
    info: DeviceInfo,
    cached_key: Option<CachedKey>,
}

impl TpmDevice {
    /// Connect to the TPM `config.tcti` names and re-create the SRK.
    ///
    /// # Errors
    /// [`DeviceError::Config`] for a bad PCR list or TCTI, or an owner hierarchy with a password;
    /// [`DeviceError::DeviceGone`] when the TPM can't be reached.
    pub fn open(config: TpmConfig) -> Result<TpmDevice> {
        let pcrs = template::check_pcrs(&config.pcrs)
            .map_err(|why| DeviceError::Config(format!("TPM PCR list: {why}")))?;
        let conf = config.tcti.name_conf()?;
        let mut ctx = Context::new(conf).map_err(|e| match map(Op::Open, e) {
            DeviceError::DeviceGone(why) => {
                DeviceError::DeviceGone(format!("cannot reach the TPM at {}: {why}", config.tcti))
            }
            other => other,
        })?;
        flush_leftovers(&mut ctx, &config.tcti)?;
        let srk_template = template::srk()?;
        let srk = ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(Hierarchy::Owner, srk_template, None, None, None, None)
            })
            .map_err(|e| map(Op::CreatePrimary, e))?
            .key_handle;
        let mut info = read_info(&mut ctx, &config.tcti)?;
        info.algorithms = algorithms(&mut ctx);
        tracing::debug!(tcti = %config.tcti, manufacturer = %info.manufacturer, "TPM opened");
        let signature_files = match config.pcr_signature {
            Some(file) => vec![file],
            None => DEFAULT_SIGNATURE_FILES.iter().map(PathBuf::from).collect(),
        };
        Ok(TpmDevice {
            ctx,
            srk,
            pcrs,
            signature_files,
            info,
            cached_key: None,
        })
    }

    /// Load stored blobs under the SRK. Loading authorises the SRK (empty auth) with a password
    /// session: the private blob is already encrypted by the TPM, nothing secret goes over.
    fn load(&mut self, public: Public, private: &[u8]) -> Result<TpmKey> {
        let private = Private::try_from(private.to_vec()).map_err(|e| map(Op::Load, e))?;
        let srk = self.srk;
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.load(srk, private, public)
            })
            .map_err(|e| map(Op::Load, e))
    }

    /// Drop the cached signing key from the TPM.
    fn evict_cached_key(&mut self) {
        if let Some(cached) = self.cached_key.take() {
            flush_quietly(&mut self.ctx, cached.handle.into());
        }
    }
}

/// First handle of the transient-object range (TPM_HT_TRANSIENT).
const TRANSIENT_FIRST: u32 = 0x8000_0000;
/// First handle of the loaded-session range (TPM_HT_LOADED_SESSION).
const LOADED_SESSION_FIRST: u32 = 0x0200_0000;
/// More than any TPM has slots for (swtpm: 3 objects, 3 sessions).
const LEFTOVERS_MAX: u32 = 64;

/// Flush the transient objects and loaded sessions a previous owner left in the TPM.
///
/// Why: a TPM keeps transient objects and sessions until they are flushed or the TPM resets, and
/// it has very few slots (swtpm: 3 of each). A `keywardd` that is killed — or that exits without
/// dropping its device — leaves its SRK, a cached signing key and maybe a policy session loaded;
/// without a resource manager in between (swtpm over TCP, `/dev/tpm0`), three such exits fill
/// the TPM and every later open fails with `TPM_RC_OBJECT_MEMORY`. Behind the kernel's resource
/// manager (`/dev/tpmrm0`) a connection sees only its own handles, none at open, so this is a
/// no-op there; without one, only one client can use the TPM at a time anyway, so what is
/// loaded when we open belongs to no one alive.
///
/// # Errors
/// [`DeviceError::DeviceGone`] when the TPM does not answer (this is the first command of an
/// open); other failures only mean nothing is flushed.
fn flush_leftovers(ctx: &mut Context, tcti: &Tcti) -> Result<()> {
    let mut flushed = 0usize;
    for first in [TRANSIENT_FIRST, LOADED_SESSION_FIRST] {
        let listed = ctx.execute_without_session(|c| {
            c.get_capability(CapabilityType::Handles, first, LEFTOVERS_MAX)
        });
        let handles = match listed {
            Ok((CapabilityData::Handles(list), _)) => list.into_inner(),
            Ok(_) => continue,
            Err(e) => match map(Op::GetCapability, e) {
                DeviceError::DeviceGone(why) => {
                    return Err(DeviceError::DeviceGone(format!(
                        "cannot reach the TPM at {tcti}: {why}"
                    )))
                }
                other => {
                    tracing::debug!(error = %other, "listing leftover TPM handles failed");
                    continue;
                }
            },
        };
        for handle in handles {
            match ctx.tr_from_tpm_public(handle) {
                Ok(object) => match ctx.flush_context(object) {
                    Ok(()) => flushed += 1,
                    Err(e) => tracing::debug!(error = %e, "flushing a leftover TPM handle failed"),
                },
                Err(e) => tracing::debug!(error = %e, "a leftover TPM handle has no ESAPI object"),
            }
        }
    }
    if flushed > 0 {
        tracing::warn!(
            flushed,
            "flushed TPM objects and sessions a previous owner left loaded"
        );
    }
    Ok(())
}

/// Parse a stored public area.
fn unmarshal_public(public: &[u8]) -> Result<Public> {
    Public::unmarshall(public).map_err(|e| map(Op::Unmarshal, e))
}

/// Manufacturer, vendor strings and firmware version, in one GetCapability.
fn read_info(ctx: &mut Context, tcti: &Tcti) -> Result<DeviceInfo> {
    let (data, _) = ctx
        .execute_without_session(|c| {
            // TPM_PT_MANUFACTURER (0x105) through TPM_PT_FIRMWARE_VERSION_2 (0x10c).
            c.get_capability(
                CapabilityType::TpmProperties,
                PropertyTag::Manufacturer.into(),
                8,
            )
        })
        .map_err(|e| map(Op::GetCapability, e))?;
    let CapabilityData::TpmProperties(props) = data else {
        return Err(DeviceError::Backend {
            op: Op::GetCapability.name(),
            detail: "the TPM answered with another capability".into(),
        });
    };
    let prop = |tag| props.find(tag).map_or(0, |p| p.value());
    let model: String = [
        PropertyTag::VendorString1,
        PropertyTag::VendorString2,
        PropertyTag::VendorString3,
        PropertyTag::VendorString4,
    ]
    .into_iter()
    .map(|t| ascii(prop(t)))
    .collect();
    let (fw1, fw2) = (
        prop(PropertyTag::FirmwareVersion1),
        prop(PropertyTag::FirmwareVersion2),
    );
    Ok(DeviceInfo {
        kind: DeviceKind::Tpm2,
        manufacturer: ascii(prop(PropertyTag::Manufacturer)).trim().to_owned(),
        model: model.trim().to_owned(),
        // The TCG convention (and what Windows and tpm2-tools show): four 16-bit fields.
        serial: format!(
            "{}.{}.{}.{}",
            fw1 >> 16,
            fw1 & 0xffff,
            fw2 >> 16,
            fw2 & 0xffff
        ),
        label: tcti.to_string(),
        algorithms: Vec::new(),
    })
}

/// The key algorithms this TPM can make, asked with `TPM2_TestParms` for each template's
/// parameters (a TPM need not have RSA-3072, or RSA at all). A probe that fails leaves the
/// algorithm out.
fn algorithms(ctx: &mut Context) -> Vec<KeyAlgorithm> {
    let mut out = Vec::new();
    for algorithm in KeyAlgorithm::ALL {
        let parameters = match algorithm {
            a if sign::is_rsa(a) => template::rsa_parameters(a).map(PublicParameters::Rsa),
            KeyAlgorithm::EcdsaP256 => template::ecdsa_p256_signing_key().and_then(|p| match p {
                Public::Ecc { parameters, .. } => Ok(PublicParameters::Ecc(parameters)),
                _ => Err(DeviceError::Unsupported("not an ECC template".into())),
            }),
            // Ed25519: no TPM 2.0 has it (TPM_ECC_CURVE has no Edwards curve in 1.59).
            _ => continue,
        };
        let Ok(parameters) = parameters else { continue };
        match ctx.execute_without_session(|c| c.test_parms(parameters)) {
            Ok(()) => out.push(algorithm),
            Err(e) => tracing::debug!(%algorithm, error = %e, "TPM2_TestParms refused"),
        }
    }
    out
}

/// A TPM property that packs four ASCII characters big-endian; NULs and non-printables dropped.
fn ascii(v: u32) -> String {
    v.to_be_bytes()
        .into_iter()
        .filter(|b| b.is_ascii_graphic() || *b == b' ')
        .map(char::from)
        .collect()
}

impl Device for TpmDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Reads the SRK's public area: one round trip that fails both when the TPM is unreachable
    /// and when it was reset under us (the SRK handle is gone), the two cases a reopen fixes.
    fn ping(&mut self) -> Result<()> {
        let srk = self.srk;
        self.ctx
            .execute_without_session(|c| c.read_public(srk))
            .map(|_| ())
            .map_err(|e| map(Op::Ping, e))
    }

    fn counter(&mut self, index: u32, increment: bool) -> Result<crate::Counter> {
        counter::counter(&mut self.ctx, index, increment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults() {
        let c: TpmConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, TpmConfig::default());
        assert_eq!(c.pcrs, vec![7]);
        assert_eq!(c.tcti.to_string(), "device:/dev/tpmrm0");
        assert!(serde_json::from_str::<TpmConfig>(r#"{"pcr":[7]}"#).is_err());
    }

    #[test]
    fn bad_pcr_config_fails_before_connecting() {
        let config = TpmConfig {
            tcti: "swtpm:host=127.0.0.1,port=1".parse().unwrap(),
            pcrs: vec![24],
            pcr_signature: None,
        };
        assert!(matches!(
            TpmDevice::open(config),
            Err(DeviceError::Config(_))
        ));
    }

    #[test]
    fn vendor_strings() {
        assert_eq!(ascii(0x4942_4d00), "IBM");
        assert_eq!(ascii(0x5357_2020), "SW  ");
    }
}
