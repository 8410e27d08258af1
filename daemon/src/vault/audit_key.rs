//! The audit log's signing key, and how the vault tells the audit log about it.
//!
//! The key is derived from the VMK (HKDF-SHA256, the vault id as salt, a fixed info string),
//! so it exists only while the vault is open and nobody without the VMK can sign a checkpoint;
//! nothing about it is stored. A rekey changes the VMK and so the key: the vault asks the audit
//! log to hand the log over to the next key *before* the new VMK is committed, so the log never
//! meets a key it was not told about.
//!
//! Must not: return the key bytes anywhere but into an `ed25519_dalek::SigningKey` (zeroized on
//! drop), or let the audit log reach back into the vault (it is called under the vault's lock).

use std::future::Future;
use std::pin::Pin;

use ed25519_dalek::{SigningKey, VerifyingKey};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::crypto::Key32;
use crate::audit::AuditError;

/// HKDF info: names the key's one use, so no other derivation from the VMK can collide.
const INFO: &[u8] = b"keyward audit signing key v1";

/// The audit signing key of the vault `vault_id` under `vmk`.
pub fn derive(vmk: &Key32, vault_id: &[u8; 16]) -> SigningKey {
    // The VMK goes straight into HKDF; the output straight into the signing key.
    let hk = Hkdf::<Sha256>::new(Some(vault_id), vmk.expose());
    let mut seed = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit: expand cannot fail.
    let _ = hk.expand(INFO, &mut seed[..]);
    SigningKey::from_bytes(&seed)
}

/// A hook's completion: resolves once the audit log has done what it was told (and what it
/// wrote is durable).
pub type Done<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the vault tells the audit log. Called, and awaited, with the vault's state lock held,
/// from a runtime worker: implementations must not call into the vault, and must do their disk
/// work (`fdatasync`) off the calling thread, started when the hook is called and in call
/// order, so that a caller that stops waiting neither loses nor reorders it.
pub trait AuditKeys: Send + Sync {
    /// The vault is open; `key` signs checkpoints from now on. `by` says what opened it.
    fn opened(&self, key: SigningKey, by: &str) -> Done<()>;
    /// The vault is closed (sealed, or never opened); `why` says why. The key must be dropped
    /// after a last checkpoint.
    fn closed(&self, why: &str) -> Done<()>;
    /// A rekey is about to commit a VMK whose audit key is `next`. The log must durably name
    /// `next` before the commit; an error aborts the rekey (fail closed).
    ///
    /// # Errors
    /// The hand-over could not be written.
    fn rekeying(&self, next: &VerifyingKey) -> Done<Result<(), AuditError>>;
    /// The rekey committed (`Some(new key)`) or did not (`None`).
    fn rekeyed(&self, key: Option<SigningKey>) -> Done<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_depends_on_the_vmk_and_the_vault_and_nothing_else() {
        let vmk = Key32::from_bytes(&[1; 32]).unwrap();
        let other = Key32::from_bytes(&[2; 32]).unwrap();
        let a = derive(&vmk, &[0; 16]).verifying_key();
        assert_eq!(a, derive(&vmk, &[0; 16]).verifying_key());
        assert_ne!(a, derive(&other, &[0; 16]).verifying_key());
        assert_ne!(a, derive(&vmk, &[1; 16]).verifying_key());
    }
}
