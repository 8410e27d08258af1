//! A bare cryptoki `C_Sign` loop on a SoftHSM token: one logged-in session per thread, the key
//! handle found once per session, nothing per signature but the host-side SHA-256 that
//! `CKM_ECDSA` needs (SoftHSM lacks `CKM_ECDSA_SHA256`) and `C_Sign` itself.
//!
//! SoftHSM may be initialised once per process: [`RawToken::open`] is called once, with
//! `SOFTHSM2_CONF` already pointing at the baseline token.

use anyhow::{anyhow, bail, Context as _, Result};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use sha2::{Digest as _, Sha256};

/// DER of the P-256 curve OID 1.2.840.10045.3.1.7.
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of the Ed25519 curve OID 1.3.101.112.
const ED25519_PARAMS: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];

/// Which key a [`RawSigner`] signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    EcdsaP256,
    Ed25519,
}

impl Alg {
    fn id(self) -> &'static [u8] {
        match self {
            Alg::EcdsaP256 => b"raw-p256",
            Alg::Ed25519 => b"raw-ed25519",
        }
    }
}

/// The baseline token, loaded once in this process.
pub struct RawToken {
    ctx: Pkcs11,
    slot: Slot,
    pin: String,
}

impl std::fmt::Debug for RawToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawToken")
            .field("slot", &self.slot)
            .finish()
    }
}

impl RawToken {
    /// Load `module`, initialise it (once per process), find the token labelled `label`, and
    /// make one P-256 and one Ed25519 key pair on it.
    ///
    /// # Errors
    /// Any PKCS#11 failure, or no token with that label.
    pub fn open(module: &str, label: &str, pin: &str) -> Result<Self> {
        let ctx = Pkcs11::new(module).with_context(|| format!("loading {module}"))?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .context("C_Initialize")?;
        let slot = ctx
            .get_slots_with_token()
            .context("C_GetSlotList")?
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .map(|i| i.label().trim() == label)
                    .unwrap_or(false)
            })
            .ok_or_else(|| anyhow!("no token labelled {label}"))?;
        let token = RawToken {
            ctx,
            slot,
            pin: pin.to_owned(),
        };
        let session = token.session()?;
        for (alg, mechanism, params) in [
            (
                Alg::EcdsaP256,
                Mechanism::EccKeyPairGen,
                P256_PARAMS.to_vec(),
            ),
            (
                Alg::Ed25519,
                Mechanism::EccEdwardsKeyPairGen,
                ED25519_PARAMS.to_vec(),
            ),
        ] {
            let public = [
                Attribute::Token(true),
                Attribute::Verify(true),
                Attribute::Id(alg.id().to_vec()),
                Attribute::EcParams(params),
            ];
            let private = [
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                Attribute::Id(alg.id().to_vec()),
            ];
            session
                .generate_key_pair(&mechanism, &public, &private)
                .with_context(|| format!("C_GenerateKeyPair {alg:?}"))?;
        }
        Ok(token)
    }

    /// The token's slot id and user PIN, for a peer (Parsec) that works on the same token.
    pub fn slot_and_pin(&self) -> (u64, &str) {
        (self.slot.id(), &self.pin)
    }

    /// A new logged-in session (a second login in this process is already done: fine).
    fn session(&self) -> Result<Session> {
        let session = self
            .ctx
            .open_rw_session(self.slot)
            .context("C_OpenSession")?;
        match session.login(UserType::User, Some(&AuthPin::new(self.pin.clone().into()))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e) => Err(e).context("C_Login"),
        }
    }

    /// A signer on a session of its own, for one thread.
    ///
    /// # Errors
    /// Session, login or key lookup failures.
    pub fn signer(&self, alg: Alg) -> Result<RawSigner> {
        let session = self.session()?;
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Id(alg.id().to_vec()),
            ])
            .context("C_FindObjects")?;
        let [key] = found[..] else {
            bail!(
                "expected one {alg:?} key on the baseline token, found {}",
                found.len()
            );
        };
        Ok(RawSigner { session, key, alg })
    }
}

/// One session and one key: a `C_Sign` per call.
#[derive(Debug)]
pub struct RawSigner {
    session: Session,
    key: ObjectHandle,
    alg: Alg,
}

impl RawSigner {
    /// Sign `data` as the daemon's token backend would (ECDSA over its SHA-256, Ed25519 pure).
    ///
    /// # Errors
    /// `C_Sign` failed.
    pub fn sign(&mut self, data: &[u8]) -> Result<Vec<u8>> {
        let signature = match self.alg {
            Alg::EcdsaP256 => {
                let digest = Sha256::digest(data);
                self.session.sign(&Mechanism::Ecdsa, self.key, &digest)
            }
            Alg::Ed25519 => self.session.sign(
                &Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                self.key,
                data,
            ),
        };
        signature.context("C_Sign")
    }
}
