//! The `keyward` command line: its arguments (clap), the exit codes scripts rely on, and the
//! one-line error messages people read.
//!
//! It only talks to `keywardd` through [`keyward::Client`]; it never takes a secret, PIN or
//! recovery share on its command line (they come from files or stdin) and never prints one
//! to stderr.

mod attest;
mod audit;
mod backup;
mod commands;
mod csr;
pub mod input;
pub mod output;
mod policy;
mod watch;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{ArgGroup, Args, Parser, Subcommand};
use keyward::api::{ApiError, KeyAlgorithm, KeyName, SecretName, SignHash, TransitKeyName};
use keyward::{ClientError, DEFAULT_SOCKET};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  keywardd refused the request (permission, not found, invalid argument, device
     trouble, ...), a local file could not be read or written, `audit verify` found
     the log altered, or `policy check` found the file invalid or the request denied
  2  usage: bad arguments or input
  3  keywardd cannot be reached (not running, wrong --socket, no access to the socket,
     connection lost)
  4  the vault is sealed or not initialised: see `keyward status`, `keyward unseal`
  5  keywardd is running but busy: it turned this connection away (this user holds all
     the connections it may, or the slots left are root's) or a device queue is full;
     try again
  6  keywardd's state directory is on a full file system: the request was refused (or
     not acknowledged); free space there and retry

Secret values, PINs and recovery shares are never taken on the command line: they are read
from stdin or from a file.";

/// Admin and scripting command line of keywardd, the hardware-backed key custodian.
#[derive(Debug, Parser)]
#[command(name = "keyward", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// The keywardd API socket.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "KEYWARD_SOCKET",
        default_value = DEFAULT_SOCKET
    )]
    pub socket: PathBuf,
    /// Print one JSON document on stdout instead of text (errors too, as {"error": ...}).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show whether the vault is sealed (and why), its devices and its keyslots.
    Status,
    /// Create the vault master key and enroll its first keyslots (at least one).
    Init(InitArgs),
    /// Open a sealed vault with recovery shares (one per line on stdin, or --share-file) or a
    /// PIN (--pin-file).
    Unseal(UnsealArgs),
    /// Make keywardd forget the master key until the next unseal.
    Seal,
    /// Add a keyslot (the vault must be unsealed).
    #[command(subcommand)]
    Enroll(Enroll),
    /// List or remove keyslots.
    #[command(subcommand)]
    Keyslot(KeyslotCommand),
    /// Replace the master key; every keyslot is sealed again and recovery slots get new
    /// shares. With recovery slots it takes effect once K of each new share set are typed
    /// back (at the prompt, or later with --confirm-from); until then the old shares work.
    Rekey(RekeyArgs),
    /// Prove you hold new recovery shares (from init, enroll recovery or rekey): K shares of
    /// each new set, one per line, from FILE or stdin. A pending rekey then takes effect.
    ConfirmRecovery {
        /// Read the shares from this file [default: stdin].
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Start a new data-key term for new secret versions; old versions stay readable.
    Rotate,
    /// Store, fetch, list and delete secrets.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Create signing keys inside a device, sign, fetch public keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Encryption as a service: transit keys that never leave keywardd (the same keys the
    /// OpenBao-compatible transit socket serves).
    #[command(subcommand)]
    Transit(TransitCommand),
    /// Verify or follow an audit log file (offline: works on a copy, no daemon needed).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Check a policy file offline, as keywardd would load it, and explain its decision for a
    /// caller (no daemon is asked).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (keyward(1) and one per subcommand) into DIR, for packaging.
    /// Hidden: the pages come from these very definitions, so they can't drift from the binary.
    #[command(hide = true)]
    Manpages {
        /// The directory to write into (created if missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Write a backup of the vault to FILE.
    ///
    /// A consistent snapshot that keywardd takes while it keeps serving, holding only sealed
    /// blobs and ciphertext, with the audit log's head; FILE gets mode 0600 and is replaced
    /// atomically. Needs admin. Restore it with `keyward restore FILE` into an empty state
    /// directory.
    Backup {
        /// Where to write it.
        file: PathBuf,
    },
    /// Check the setup for what admins get wrong, with the fix for each finding.
    ///
    /// Config and policy, state directory and PIN file modes, SoftHSM config, TPM reachable
    /// and its PCR banks, token URI matching exactly one token, D-Bus policy, sockets
    /// (reachable, and by whom), RLIMIT_MEMLOCK, the clock. Prints ok, warn or fail for each;
    /// exits 1 on any fail. Runs `keywardd --doctor` (the daemon's own config and device
    /// code), found beside `keyward`, in /usr/sbin or on PATH; run it as root or as
    /// keywardd's user.
    Doctor {
        /// keywardd's configuration file.
        #[arg(
            long,
            value_name = "PATH",
            default_value = "/etc/keyward/keywardd.toml"
        )]
        config: PathBuf,
    },
    /// Restore a backup into keywardd's empty state directory (offline: keywardd not
    /// running). Runs `keywardd --restore FILE` (the daemon's own config and schema checks),
    /// found as for `doctor`; run it as root. The vault then opens with recovery shares or
    /// the same token; `enroll tpm2` binds it to this machine's TPM.
    Restore {
        /// The backup file (`keyward backup FILE`).
        file: PathBuf,
        /// keywardd's configuration file (it names the state directory).
        #[arg(
            long,
            value_name = "PATH",
            default_value = "/etc/keyward/keywardd.toml"
        )]
        config: PathBuf,
    },
    /// The OpenBao upstream sync ([upstream] in keywardd.toml): its status, or a sync now.
    #[command(subcommand)]
    Upstream(UpstreamCommand),
    /// Watch secrets change, one line per change, until stopped.
    ///
    /// Each change of a secret this user may read is a line `put NAME VERSION` or
    /// `delete NAME` (with --json, one JSON object per line); no value is ever shown. With
    /// --restart-unit, `systemctl try-restart UNIT...` runs after each change. If the watch
    /// falls too far behind (the daemon holds 256 changes for it), the units are restarted
    /// once, since what changed is unknown, and the command exits 1.
    Watch(WatchArgs),
}

/// `keyward watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Secrets to watch (default: all this user may read); NAME* watches a prefix.
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,
    /// A systemd unit to `systemctl try-restart` after each change (repeatable).
    #[arg(long = "restart-unit", value_name = "UNIT", value_parser = watch::parse_unit)]
    pub restart_units: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum UpstreamCommand {
    /// Last success, last error, the token's time left and each mapped secret's versions.
    Status,
    /// Sync now and show the status after it; exits 1 when the sync failed.
    Sync,
    /// Print a certificate signing request (PEM) for the machine key `[upstream] key` names,
    /// signed inside its device: what the cluster's CA signs for `auth/cert`.
    Csr {
        /// The subject, RFC 4514 (most specific first): "CN=host.example,O=Example".
        #[arg(long, value_name = "DN", value_parser = csr::parse_subject)]
        subject: x509_cert::name::Name,
        /// A DNS name for the subjectAltName extension request (repeatable).
        #[arg(long, value_name = "NAME", value_parser = csr::parse_dns_name)]
        dns: Vec<der::asn1::Ia5String>,
    },
}

/// `K/N`: K of N recovery shares open the vault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold {
    pub k: u8,
    pub n: u8,
}

fn parse_threshold(s: &str) -> Result<Threshold, String> {
    let (k, n) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected K/N, like 2/3"))?;
    let k: u8 = k
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: K must be a number from 1 to 255"))?;
    let n: u8 = n
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: N must be a number from 1 to 255"))?;
    check_threshold(k, n)?;
    Ok(Threshold { k, n })
}

fn check_threshold(k: u8, n: u8) -> Result<(), String> {
    if k == 0 || k > n {
        return Err(format!(
            "{k} of {n}: the threshold must be at least 1 and at most the number of shares"
        ));
    }
    Ok(())
}

fn pcr_parser() -> impl clap::builder::TypedValueParser<Value = u8> {
    clap::value_parser!(u8).range(0..=23)
}

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("slots").required(true).multiple(true).args(["tpm2", "pkcs11", "recovery"])
))]
pub struct InitArgs {
    /// Enroll a TPM 2.0 keyslot on this configured device (repeatable).
    #[arg(long, value_name = "DEVICE")]
    pub tpm2: Vec<String>,
    /// PCRs (sha256 bank) the TPM slots are bound to, e.g. 7,11 [default: the device's list].
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = pcr_parser(), requires = "tpm2")]
    pub pcrs: Option<Vec<u8>>,
    /// File holding a PIN the TPM slots will need on top of their PCR policy.
    #[arg(long, value_name = "FILE", requires = "tpm2")]
    pub tpm2_pin_file: Option<PathBuf>,
    /// Also bind the TPM slots to PCR policies signed by this RSA public key (PEM), as
    /// `systemd-measure sign` makes them: they then survive updates that ship a signature.
    #[arg(long, value_name = "FILE.pem", requires = "tpm2")]
    pub pcr_public_key: Option<PathBuf>,
    /// The PCRs (sha256 bank) the signed policies cover [default: 11].
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = pcr_parser(), requires = "pcr_public_key")]
    pub pcr_public_key_pcrs: Option<Vec<u8>>,
    /// Enroll a PKCS#11 token keyslot on this configured device (repeatable).
    #[arg(long, value_name = "DEVICE")]
    pub pkcs11: Vec<String>,
    /// Make recovery shares: K of N open the vault (e.g. 2/3). They are printed once.
    #[arg(long, value_name = "K/N", value_parser = parse_threshold)]
    pub recovery: Option<Threshold>,
}

#[derive(Debug, Args)]
pub struct UnsealArgs {
    /// Read recovery shares from this file, one per line [default: stdin].
    #[arg(long, value_name = "FILE", conflicts_with = "pin_file")]
    pub share_file: Option<PathBuf>,
    /// Unseal with the PIN in this file (a PIN-bound TPM slot or a token) instead.
    #[arg(long, value_name = "FILE")]
    pub pin_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Enroll {
    /// A TPM 2.0 keyslot, bound to PCR values and optionally a PIN.
    Tpm2 {
        /// The configured TPM device.
        #[arg(long, value_name = "DEVICE")]
        device: String,
        /// PCRs (sha256 bank), e.g. 7,11 [default: the device's list].
        #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = pcr_parser())]
        pcrs: Option<Vec<u8>>,
        /// File holding a PIN the slot will need on top of its PCR policy.
        #[arg(long, value_name = "FILE")]
        pin_file: Option<PathBuf>,
        /// Also bind the slot to PCR policies signed by this RSA public key (PEM), as
        /// `systemd-measure sign` makes them: it then survives updates that ship a signature.
        #[arg(long, value_name = "FILE.pem")]
        pcr_public_key: Option<PathBuf>,
        /// The PCRs (sha256 bank) the signed policies cover [default: 11].
        #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = pcr_parser(), requires = "pcr_public_key")]
        pcr_public_key_pcrs: Option<Vec<u8>>,
    },
    /// A PKCS#11 token keyslot.
    Pkcs11 {
        /// The configured token device.
        #[arg(long, value_name = "DEVICE")]
        device: String,
    },
    /// Recovery shares: THRESHOLD of SHARES open the vault. They are printed once.
    Recovery {
        /// Shares needed to unseal.
        #[arg(long, value_name = "K")]
        threshold: u8,
        /// Shares made.
        #[arg(long, value_name = "N")]
        shares: u8,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyslotCommand {
    /// List the keyslots.
    List,
    /// Remove a keyslot.
    Remove {
        /// The keyslot's id (see `keyward keyslot list`).
        id: u32,
        /// Remove the last hardware slot even though no recovery slot exists.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct RekeyArgs {
    /// File holding the PIN of PIN-bound TPM slots.
    #[arg(long, value_name = "FILE")]
    pub pin_file: Option<PathBuf>,
    /// Start no rekey: confirm the pending one with the new shares in FILE (`-`: stdin), K
    /// of each set, one per line (the same as `keyward confirm-recovery FILE`).
    #[arg(long, value_name = "FILE", conflicts_with = "pin_file")]
    pub confirm_from: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Store a new version of a secret; the value comes from stdin (to EOF) or --file.
    Put {
        /// The secret's name (like db/password).
        name: SecretName,
        /// Read the value from this file instead of stdin.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Write a secret's value (raw bytes) to stdout or --output.
    Get {
        /// The secret's name.
        name: SecretName,
        /// This version instead of the latest.
        #[arg(long, value_name = "N")]
        version: Option<u64>,
        /// Write the value to this file (created with mode 0600).
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// List secret names.
    List {
        /// Only names starting with this.
        #[arg(long, value_name = "PREFIX")]
        prefix: Option<String>,
    },
    /// List a secret's versions.
    Versions {
        /// The secret's name.
        name: SecretName,
    },
    /// Delete a secret and all its versions.
    Delete {
        /// The secret's name.
        name: SecretName,
    },
}

/// `--algorithm`: the contract's names, offered to completions.
fn algorithm() -> impl TypedValueParser<Value = KeyAlgorithm> {
    PossibleValuesParser::new(KeyAlgorithm::ALL.map(KeyAlgorithm::as_str))
        .try_map(|s| s.parse::<KeyAlgorithm>())
}

/// `--hash`: the contract's names, offered to completions.
fn sign_hash() -> impl TypedValueParser<Value = SignHash> {
    PossibleValuesParser::new(SignHash::ALL.map(SignHash::as_str))
        .try_map(|s| s.parse::<SignHash>())
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Generate a key pair inside a device; prints the public key (PEM).
    Create {
        /// The key's name.
        name: KeyName,
        /// The configured device to create it in.
        #[arg(long, value_name = "DEVICE")]
        device: String,
        /// The signature algorithm.
        #[arg(long, value_parser = algorithm())]
        algorithm: KeyAlgorithm,
    },
    /// List keys.
    List,
    /// Print a public key: PEM, DER with --der, or an OpenSSH line with --ssh.
    Public {
        /// The key's name.
        name: KeyName,
        /// Raw DER SubjectPublicKeyInfo instead of PEM.
        #[arg(long, conflicts_with = "ssh")]
        der: bool,
        /// An OpenSSH public key line (`ssh-ed25519 AAAA… NAME`), for `authorized_keys` or
        /// git's `user.signingkey`.
        #[arg(long)]
        ssh: bool,
        /// Write it to this file.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Sign data from stdin (to EOF) or --file; writes the raw signature (Ed25519: 64 bytes,
    /// ECDSA: DER, RSA: raw).
    Sign {
        /// The key's name.
        name: KeyName,
        /// Sign this file's contents instead of stdin.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// The input is a digest (32 bytes for SHA-256, 64 for SHA-512), not the message.
        #[arg(long)]
        prehashed: bool,
        /// The hash to sign over: sha256, or sha512 for rsa-pkcs1-3072 keys.
        #[arg(long, value_name = "HASH", value_parser = sign_hash())]
        hash: Option<SignHash>,
        /// Write the signature to this file.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Print a PKCS#10 certificate signing request (PEM) for a key, signed inside its device
    /// (the daemon's `sign` policy and audit apply). Ed25519, ECDSA P-256 and RSA PKCS#1 keys.
    Csr {
        /// The key's name.
        name: KeyName,
        /// The subject, RFC 4514 (most specific first): "CN=host.example,O=Example".
        #[arg(long, value_name = "DN", value_parser = csr::parse_subject)]
        subject: x509_cert::name::Name,
        /// A DNS name for the subjectAltName extension request (repeatable).
        #[arg(long, value_name = "NAME", value_parser = csr::parse_dns_name)]
        dns: Vec<der::asn1::Ia5String>,
    },
    /// Delete a key (destroyed in its device).
    Delete {
        /// The key's name.
        name: KeyName,
    },
    /// Attest a key (JSON document): a TPM certifies its own key (TPM2_Certify by its
    /// attestation key, whose public key and the TPM's EK certificates come along); for a
    /// PKCS#11 key, the token's attributes signed by the vault's audit key, which is not a
    /// hardware attestation (SoftHSM has none).
    Attest {
        /// The key's name.
        name: KeyName,
        /// A nonce to bind, hex, 1 to 64 bytes (the verifier's, for freshness) [default: 32
        /// random bytes].
        #[arg(long, value_name = "HEX", value_parser = attest::parse_nonce)]
        nonce: Option<attest::Nonce>,
        /// Write the document to this file (and print who signed it).
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Verify an attestation document offline (no daemon is asked). Exit 1 if it fails.
    VerifyAttestation {
        /// The document `keyward key attest` wrote.
        file: PathBuf,
        /// The nonce the attestation must carry (hex).
        #[arg(long, value_name = "HEX", value_parser = attest::parse_nonce)]
        nonce: Option<attest::Nonce>,
        /// The signer you trust: the TPM's attestation key, or the audit key `keyward status`
        /// shows (a PEM or DER file, or base64 DER).
        #[arg(long, value_name = "KEY|FILE")]
        signer: Option<String>,
        /// The public key the attested key must have (a PEM or DER file, e.g. from `keyward
        /// key public`, or base64 DER).
        #[arg(long, value_name = "KEY|FILE")]
        public_key: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TransitCommand {
    /// Create a transit key (version 1); needs admin.
    Create {
        /// The key's name (one segment: no '/').
        name: TransitKeyName,
    },
    /// Add a new version of a transit key for encryption; older versions still decrypt.
    Rotate {
        /// The key's name.
        name: TransitKeyName,
    },
    /// Encrypt data from stdin (to EOF) or --file; prints vault:v<N>:<base64>.
    Encrypt {
        /// The key's name.
        name: TransitKeyName,
        /// Encrypt this file's contents instead of stdin.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Bind this text to the ciphertext: decrypting needs the same text.
        #[arg(long, value_name = "TEXT")]
        associated_data: Option<String>,
    },
    /// Decrypt a ciphertext of `transit encrypt`; writes the plaintext to stdout or --output.
    Decrypt {
        /// The key's name.
        name: TransitKeyName,
        /// The ciphertext (vault:v<N>:<base64>).
        ciphertext: String,
        /// The text given to `transit encrypt --associated-data`.
        #[arg(long, value_name = "TEXT")]
        associated_data: Option<String>,
        /// Write the plaintext to this file (created with mode 0600).
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain, the sequence and every checkpoint signature; name the first bad
    /// record. With an anchor (`audit.anchor` beside `audit.log`, or --anchor) or --expect-seq,
    /// a log cut short or rewritten after the anchored checkpoint is caught too.
    Verify {
        /// The log: `audit.log`, or the files of a rolled-over log in order (`audit.log.1
        /// audit.log.2 audit.log`), or the directory that holds them.
        #[arg(required = true, num_args = 1.., value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// The log must reach this seq (the last one you saw, from the journal's checkpoint
        /// events or an earlier verify).
        #[arg(long, value_name = "N")]
        expect_seq: Option<u64>,
        /// An anchor the daemon signed (`audit.anchor`, or a copy kept elsewhere) [default:
        /// audit.anchor beside audit.log, when the files given end with audit.log].
        #[arg(long, value_name = "FILE")]
        anchor: Option<PathBuf>,
        /// The key to trust: a PEM file, or the base64 key `keyward status` shows
        /// [default: audit.pub beside the log]. Any key the log was handed over to or from by
        /// a rekey works.
        #[arg(long, value_name = "KEY|FILE")]
        public_key: Option<String>,
    },
    /// Print the last records (one line each, or the JSON lines with --json).
    Tail {
        /// The log.
        path: PathBuf,
        /// How many records.
        #[arg(short = 'n', long, value_name = "N", default_value_t = 10)]
        lines: usize,
        /// Keep printing records as they are appended.
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Load the file with keywardd's checks (owner, mode, syntax, names), list its rules; with
    /// --action, say which rule allows the request, or why each rule passes it over.
    Check(PolicyCheckArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("caller").args(["uid", "user"])))]
#[command(group(ArgGroup::new("resource").args(["secret", "key"])))]
pub struct PolicyCheckArgs {
    /// The policy file.
    #[arg(value_name = "FILE", default_value = "/etc/keyward/policy.toml")]
    pub file: PathBuf,
    /// The caller's uid (its primary gid and groups are looked up, when it is a known user).
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,
    /// The caller's user name (its uid, primary gid and groups are looked up).
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// The caller's primary gid, instead of the user's.
    #[arg(long, value_name = "GID")]
    pub gid: Option<u32>,
    /// A supplementary group of the caller, by name or gid (repeatable), on top of the user's.
    #[arg(long, value_name = "GROUP")]
    pub group: Vec<String>,
    /// The caller's systemd system unit, e.g. postgresql.service.
    #[arg(long, value_name = "UNIT")]
    pub unit: Option<String>,
    /// What the caller asks to do: read, write, sign, keys, admin, encrypt or decrypt.
    #[arg(long, value_name = "ACTION", requires = "caller")]
    pub action: Option<keyward_policy::Action>,
    /// The secret it is done to (read, write).
    #[arg(long, value_name = "NAME", requires = "action")]
    pub secret: Option<String>,
    /// The key it is done to (sign, keys).
    #[arg(long, value_name = "NAME", requires = "action")]
    pub key: Option<String>,
    /// The transit key it is done to (encrypt, decrypt).
    #[arg(long, value_name = "NAME", requires = "action")]
    pub transit: Option<String>,
    /// The user keywardd runs as: the file must be owned by root or by it
    /// [default: keyward, when that user exists, else root only].
    #[arg(long, value_name = "NAME")]
    pub daemon_user: Option<String>,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Talking to keywardd failed, or it refused.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Bad arguments or input.
    #[error("{0}")]
    Usage(String),
    /// A local file or stream failed.
    #[error("{0}")]
    Local(String),
    /// Every share was given and the vault is still sealed.
    #[error(
        "the vault is still sealed{}: give the remaining recovery shares (one per line on stdin, or --share-file)",
        .needed.map(|n| format!(" ({n} more share(s) needed)")).unwrap_or_default()
    )]
    StillSealed { needed: Option<u8> },
    /// `policy check`: the file would not load.
    #[error("{0}")]
    PolicyInvalid(keyward_policy::PolicyError),
    /// `policy check --action`: no rule allows the request.
    #[error("denied: no rule allows {request}")]
    PolicyDenied {
        /// The request, said for a person.
        request: String,
        /// What each rule made of it (the `--json` document).
        explanation: serde_json::Value,
    },
    /// `key verify-attestation` rejected the document.
    #[error("attestation {}: {failure}", .path.display())]
    AttestationInvalid {
        path: PathBuf,
        failure: keyward::attestation::AttestationError,
    },
    /// `audit verify` found the log altered, damaged or unsigned.
    #[error("audit log {}: {failure}", .path.display())]
    AuditInvalid {
        path: PathBuf,
        failure: keyward::audit::Failure,
    },
}

/// The exit codes documented in `--help`.
pub mod exit {
    pub const OK: u8 = 0;
    pub const REFUSED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const SEALED: u8 = 4;
    pub const BUSY: u8 = 5;
    pub const STORAGE_FULL: u8 = 6;
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Client(ClientError::Connect { .. } | ClientError::Io(_)) => exit::UNREACHABLE,
            Self::Client(ClientError::Api(ApiError::Sealed { .. } | ApiError::NotInitialized))
            | Self::StillSealed { .. } => exit::SEALED,
            Self::Client(ClientError::Api(ApiError::Busy)) => exit::BUSY,
            Self::Client(ClientError::Api(ApiError::StorageFull { .. })) => exit::STORAGE_FULL,
            Self::Client(ClientError::Api(_) | ClientError::Protocol(_))
            | Self::Local(_)
            | Self::PolicyInvalid(_)
            | Self::PolicyDenied { .. }
            | Self::AuditInvalid { .. }
            | Self::AttestationInvalid { .. } => exit::REFUSED,
            Self::Usage(_) => exit::USAGE,
        }
    }

    /// The error as a JSON document, for `--json`.
    fn to_json(&self) -> serde_json::Value {
        let (name, parameters) = match self {
            Self::Client(ClientError::Api(e)) => (e.name(), e.parameters()),
            Self::Client(ClientError::Connect { .. } | ClientError::Io(_)) => {
                ("keyward.Unreachable".into(), serde_json::json!({}))
            }
            Self::Client(ClientError::Protocol(_)) => {
                ("keyward.Protocol".into(), serde_json::json!({}))
            }
            Self::Usage(_) => ("keyward.Usage".into(), serde_json::json!({})),
            Self::Local(_) => ("keyward.Local".into(), serde_json::json!({})),
            Self::StillSealed { needed } => (
                "keyward.StillSealed".into(),
                serde_json::json!({ "shares_needed": needed }),
            ),
            Self::AuditInvalid { path, failure } => (
                "keyward.AuditInvalid".into(),
                audit::failure_json(path, failure),
            ),
            Self::PolicyInvalid(_) => ("keyward.PolicyInvalid".into(), serde_json::json!({})),
            Self::AttestationInvalid { failure, .. } => (
                "keyward.AttestationInvalid".into(),
                serde_json::json!({ "reason": failure.to_string() }),
            ),
            Self::PolicyDenied { explanation, .. } => {
                ("keyward.PolicyDenied".into(), explanation.clone())
            }
        };
        serde_json::json!({ "error": {
            "name": name,
            "parameters": parameters,
            "message": self.to_string(),
            "exit_code": self.exit_code(),
        }})
    }
}

/// Parse the command line, run it, report.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match commands::run(cli) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            if json {
                let mut out = std::io::stdout().lock();
                let _ = serde_json::to_writer_pretty(&mut out, &e.to_json());
                let _ = writeln!(out);
            }
            eprintln!("keyward: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("keyward").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn init_needs_a_slot_and_takes_several() {
        assert!(parse(&["init"]).is_err());
        let cli = parse(&[
            "init",
            "--tpm2",
            "tpm",
            "--pcrs",
            "7,11",
            "--pkcs11",
            "hsm",
            "--pkcs11",
            "hsm2",
            "--recovery",
            "2/3",
        ])
        .unwrap();
        let Command::Init(a) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(a.tpm2, ["tpm"]);
        assert_eq!(a.pcrs.as_deref(), Some(&[7u8, 11][..]));
        assert_eq!(a.pkcs11, ["hsm", "hsm2"]);
        assert_eq!(a.recovery, Some(Threshold { k: 2, n: 3 }));
        assert!(parse(&["init", "--recovery", "3/2"]).is_err());
        assert!(parse(&["init", "--recovery", "0/2"]).is_err());
        assert!(parse(&["init", "--recovery", "2"]).is_err());
        assert!(
            parse(&["init", "--pkcs11", "hsm", "--pcrs", "7"]).is_err(),
            "--pcrs needs --tpm2"
        );
        assert!(parse(&["init", "--tpm2", "tpm", "--pcrs", "24"]).is_err());
    }

    #[test]
    fn globals_go_anywhere_and_the_socket_has_a_default() {
        let cli = parse(&["secret", "get", "db", "--json", "--socket", "/tmp/s"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.socket, PathBuf::from("/tmp/s"));
        // (KEYWARD_SOCKET may be set where the tests run; only check the flag wins.)
        let cli = parse(&["--socket", "/x", "status"]).unwrap();
        assert_eq!(cli.socket, PathBuf::from("/x"));
    }

    #[test]
    fn subcommands_parse() {
        assert!(matches!(
            parse(&[
                "key",
                "create",
                "k",
                "--device",
                "hsm",
                "--algorithm",
                "rsa-pss-3072"
            ])
            .unwrap()
            .command,
            Command::Key(KeyCommand::Create {
                algorithm: KeyAlgorithm::RsaPss3072,
                ..
            })
        ));
        assert!(parse(&[
            "key",
            "create",
            "k",
            "--device",
            "hsm",
            "--algorithm",
            "rsa"
        ])
        .is_err());
        assert!(matches!(
            parse(&["keyslot", "remove", "3", "--force"])
                .unwrap()
                .command,
            Command::Keyslot(KeyslotCommand::Remove { id: 3, force: true })
        ));
        assert!(matches!(
            parse(&["enroll", "tpm2", "--device", "tpm", "--pcrs", "0,7"])
                .unwrap()
                .command,
            Command::Enroll(Enroll::Tpm2 { pcrs: Some(_), .. })
        ));
        assert!(parse(&["unseal", "--share-file", "a", "--pin-file", "b"]).is_err());
        assert!(parse(&["completions", "zsh"]).is_ok());
        assert!(matches!(
            parse(&["manpages", "/tmp/man"]).unwrap().command,
            Command::Manpages { .. }
        ));
        assert!(matches!(
            parse(&["audit", "verify", "/x/audit.log", "--public-key", "k.pem"])
                .unwrap()
                .command,
            Command::Audit(AuditCommand::Verify {
                public_key: Some(_),
                ..
            })
        ));
        assert!(matches!(
            parse(&["audit", "tail", "-f", "-n", "3", "/x/audit.log"])
                .unwrap()
                .command,
            Command::Audit(AuditCommand::Tail {
                lines: 3,
                follow: true,
                ..
            })
        ));
        assert!(parse(&["audit", "verify"]).is_err(), "the path is needed");
        assert!(matches!(
            parse(&["key", "public", "git/sign", "--ssh"])
                .unwrap()
                .command,
            Command::Key(KeyCommand::Public {
                ssh: true,
                der: false,
                ..
            })
        ));
        assert!(parse(&["key", "public", "k", "--ssh", "--der"]).is_err());
        // No way to put a value on the command line.
        assert!(parse(&["secret", "put", "db", "hunter2"]).is_err());
    }

    #[test]
    fn exit_codes() {
        let api = |e: ApiError| CliError::Client(ClientError::Api(e));
        assert_eq!(api(ApiError::Sealed { reason: "x".into() }).exit_code(), 4);
        assert_eq!(api(ApiError::NotInitialized).exit_code(), 4);
        assert_eq!(CliError::StillSealed { needed: Some(1) }.exit_code(), 4);
        assert_eq!(
            api(ApiError::NotFound {
                kind: "secret".into(),
                name: "x".into()
            })
            .exit_code(),
            1
        );
        // Up but busy is not unreachable.
        assert_eq!(api(ApiError::Busy).exit_code(), 5);
        let full = api(ApiError::StorageFull {
            what: "database".into(),
        });
        assert_eq!(full.exit_code(), 6);
        assert!(full.to_string().contains("file system"), "{full}");
        assert_eq!(
            api(ApiError::Busy).to_json()["error"]["name"],
            "org.keyward.Custodian.Busy"
        );
        let connect = CliError::Client(ClientError::Connect {
            path: "/run/keyward/api.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert_eq!(connect.exit_code(), 3);
        assert!(
            connect.to_string().contains("is keywardd running"),
            "{connect}"
        );
        assert_eq!(
            CliError::Client(ClientError::Io(std::io::ErrorKind::BrokenPipe.into())).exit_code(),
            3
        );
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        assert_eq!(CliError::Local("x".into()).exit_code(), 1);
        // clap's own usage errors exit with 2 as well.
        assert_eq!(parse(&["frobnicate"]).unwrap_err().exit_code(), 2);
        let doc = api(ApiError::Sealed { reason: "r".into() }).to_json();
        assert_eq!(doc["error"]["name"], "org.keyward.Custodian.Sealed");
        assert_eq!(doc["error"]["exit_code"], 4);
    }

    #[test]
    fn help_documents_the_exit_codes() {
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("Exit codes:") && help.contains("4  the vault is sealed"));
        assert!(help.contains("5  keywardd is running but busy"));
        assert!(help.contains("6  keywardd's state directory is on a full file system"));
    }

    #[test]
    fn signed_pcr_flags_need_the_public_key() {
        assert!(matches!(
            parse(&[
                "enroll",
                "tpm2",
                "--device",
                "tpm",
                "--pcr-public-key",
                "k.pem",
                "--pcr-public-key-pcrs",
                "11,12",
            ])
            .unwrap()
            .command,
            Command::Enroll(Enroll::Tpm2 {
                pcr_public_key: Some(_),
                pcr_public_key_pcrs: Some(ref p),
                ..
            }) if p == &[11, 12]
        ));
        let only_pcrs = [
            "enroll",
            "tpm2",
            "--device",
            "tpm",
            "--pcr-public-key-pcrs",
            "11",
        ];
        assert!(parse(&only_pcrs).is_err(), "signed PCRs without the key");
        assert!(parse(&["init", "--recovery", "1/1", "--pcr-public-key", "k.pem"]).is_err());
        assert!(parse(&["init", "--tpm2", "tpm", "--pcr-public-key", "k.pem"]).is_ok());
    }
}
