//! The TPM baselines, on an swtpm of their own: a tss-esapi sign loop (ECDSA P-256 key created
//! under an ECC primary and loaded once, a password session per command, as the daemon's cached
//! key signs), and the bare unattended-unseal path through hsm-shim's TPM device: connect,
//! re-create the SRK, load the sealed object, run the PCR policy, unseal.

use std::str::FromStr as _;

use anyhow::{anyhow, Context as _, Result};
use hsm_shim::tpm::{TpmConfig, TpmDevice};
use hsm_shim::{SealPolicy, SealedBlob, Sealer as _, SecretBytes};
use sha2::{Digest as _, Sha256};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Digest, HashScheme, HashcheckTicket, Signature, SignatureScheme};
use tss_esapi::tcti_ldr::{NetworkTPMConfig, TctiNameConf};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::Context;

/// A loaded signing key on an open ESAPI context.
pub struct RawTpmSigner {
    ctx: Context,
    key: KeyHandle,
}

impl std::fmt::Debug for RawTpmSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawTpmSigner").finish_non_exhaustive()
    }
}

impl RawTpmSigner {
    /// Connect to the swtpm on `127.0.0.1:port`, create a primary and a P-256 signing key under
    /// it, and load the key.
    ///
    /// # Errors
    /// Any TPM failure.
    pub fn open(port: u16) -> Result<Self> {
        let net = NetworkTPMConfig::from_str(&format!("host=127.0.0.1,port={port}"))?;
        let mut ctx = Context::new(TctiNameConf::Swtpm(net)).context("connecting to swtpm")?;
        // The daemon's own templates: the baseline signs with the very same kind of key.
        let primary = hsm_shim::tpm::template::srk()?;
        let parent = ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(Hierarchy::Owner, primary, None, None, None, None)
            })
            .context("CreatePrimary")?
            .key_handle;
        let template = hsm_shim::tpm::template::ecdsa_p256_signing_key()?;
        let created = ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create(parent, template, None, None, None, None)
            })
            .context("Create")?;
        let key = ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.load(parent, created.out_private, created.out_public)
            })
            .context("Load")?;
        ctx.flush_context(parent.into()).context("FlushContext")?;
        Ok(Self { ctx, key })
    }

    /// Sign SHA-256(`data`): one TPM2_Sign with a password session.
    ///
    /// # Errors
    /// The TPM refused.
    pub fn sign(&mut self, data: &[u8]) -> Result<Signature> {
        let digest: [u8; 32] = Sha256::digest(data).into();
        let digest = Digest::try_from(&digest[..])?;
        let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })?;
        let scheme = SignatureScheme::EcDsa {
            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
        };
        let key = self.key;
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.sign(key, digest, scheme, ticket)
            })
            .context("Sign")
    }
}

impl Drop for RawTpmSigner {
    fn drop(&mut self) {
        // swtpm has no resource manager: a key left loaded would take a transient slot from
        // whoever connects next.
        let _ = self.ctx.flush_context(self.key.into());
    }
}

/// A 32-byte secret sealed to PCR 7 on a TPM, and how to open that TPM again.
#[derive(Debug)]
pub struct RawUnseal {
    config: TpmConfig,
    blob: SealedBlob,
}

/// What the sealed blob is bound to (any context string works; the daemon binds its vault id).
const CONTEXT: &[u8] = b"keyward-bench raw unseal";

impl RawUnseal {
    /// Seal a 32-byte secret on the TPM at `tcti`.
    ///
    /// # Errors
    /// Any TPM failure.
    pub fn prepare(tcti: &str) -> Result<Self> {
        let config = TpmConfig::new(tcti.parse().map_err(|e| anyhow!("TCTI {tcti}: {e}"))?);
        let mut device = TpmDevice::open(config.clone()).context("opening the TPM")?;
        let blob = device
            .seal(
                &SecretBytes::new(vec![0x5a; 32]),
                CONTEXT,
                &SealPolicy::default(),
            )
            .context("sealing")?;
        Ok(Self { config, blob })
    }

    /// The whole path once: connect, SRK, load, policy session + PolicyPCR, unseal.
    ///
    /// # Errors
    /// Any TPM failure, or a secret that comes back different.
    pub fn unseal_once(&self) -> Result<()> {
        let mut device = TpmDevice::open(self.config.clone()).context("opening the TPM")?;
        let secret = device
            .unseal(&self.blob, CONTEXT, None)
            .context("unsealing")?;
        anyhow::ensure!(
            secret.expose() == [0x5a; 32],
            "the TPM unsealed another secret"
        );
        Ok(())
    }
}
