//! Each `keyward` command: read its input, make its calls, print its result — as text, or as
//! one JSON document with `--json`.

use std::io::{self, IsTerminal as _, Write as _};
use std::path::Path;
use std::time::Duration;

use clap::CommandFactory as _;
use keyward::api::{
    ConfirmRecoveryReply, KeyAlgorithm, KeyName, KeyslotKind, SecretString, SecretValue, SlotSpec,
    UnsealParams, UnsealReply, MAX_SECRET_LEN,
};
use keyward::{Client, ClientError};
use serde::Serialize;
use serde_json::json;

use super::input::{self, NoEcho, Shares, ZeroizingReader};
use super::{csr, output};
use super::{
    Cli, CliError, Command, Enroll, InitArgs, KeyCommand, KeyslotCommand, RekeyArgs, SecretCommand,
    TransitCommand, UnsealArgs, UpstreamCommand,
};

/// How long a call may go without progress before the CLI gives up (key generation and
/// device waits take seconds, not minutes).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Largest input to `key sign`.
const MAX_SIGN_INPUT: usize = 1024 * 1024;

pub(crate) struct Out {
    pub(crate) json: bool,
}

impl Out {
    /// Print `doc` with `--json`, else `text` (if not empty).
    pub(crate) fn emit(
        &self,
        doc: &impl Serialize,
        text: impl FnOnce() -> String,
    ) -> Result<(), CliError> {
        let mut out = io::stdout().lock();
        let written = if self.json {
            serde_json::to_writer_pretty(&mut out, doc)
                .map_err(io::Error::from)
                .and_then(|()| writeln!(out))
        } else {
            let text = text();
            if text.is_empty() {
                Ok(())
            } else {
                out.write_all(text.as_bytes())
            }
        };
        written
            .and_then(|()| out.flush())
            .map_err(|e| CliError::Local(format!("cannot write to stdout: {e}")))
    }
}

/// Raw bytes to stdout.
fn write_stdout(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| CliError::Local(format!("cannot write to stdout: {e}")))
}

/// `keyward manpages DIR`: keyward.1 and keyward-SUBCOMMAND….1 for every visible subcommand,
/// rendered by clap_mangen from the same definitions `--help` prints.
fn manpages(dir: &Path) -> Result<(), CliError> {
    let local = |e: io::Error| CliError::Local(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(local)?;
    clap_mangen::generate_to(Cli::command(), dir).map_err(local)
}

fn connect(socket: &Path) -> Result<Client, CliError> {
    let mut client = Client::connect(socket)?;
    client.set_timeout(Some(CALL_TIMEOUT))?;
    Ok(client)
}

/// Run one parsed command line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    let out = Out { json: cli.json };
    if let Command::Completions { shell } = cli.command {
        let mut command = Cli::command();
        clap_complete::generate(shell, &mut command, "keyward", &mut io::stdout());
        return Ok(());
    }
    if let Command::Manpages { dir } = cli.command {
        return manpages(&dir);
    }
    // Offline: the log is a file; no daemon is asked.
    if let Command::Audit(cmd) = cli.command {
        return super::audit::run(cmd, cli.json);
    }
    if let Command::Policy(cmd) = cli.command {
        return super::policy::run(cmd, cli.json);
    }
    if let Command::Key(KeyCommand::VerifyAttestation {
        file,
        nonce,
        signer,
        public_key,
    }) = &cli.command
    {
        return super::attest::verify(
            &out,
            file,
            nonce.as_ref().map(|n| n.0.as_slice()),
            signer.as_deref(),
            public_key.as_deref(),
        );
    }
    if let Command::Doctor { config } = &cli.command {
        let json = cli.json.then_some("--json");
        return exec_keywardd(
            &["--doctor".as_ref(), "--config".as_ref(), config.as_os_str()]
                .into_iter()
                .chain(json.map(AsRef::as_ref))
                .collect::<Vec<&std::ffi::OsStr>>(),
        );
    }
    if let Command::Restore { file, config } = &cli.command {
        return exec_keywardd(&[
            "--restore".as_ref(),
            file.as_os_str(),
            "--config".as_ref(),
            config.as_os_str(),
        ]);
    }
    if let Command::Watch(args) = &cli.command {
        return super::watch::run(&cli.socket, &out, args);
    }
    let mut client = connect(&cli.socket)?;
    let c = &mut client;
    match cli.command {
        Command::Completions { .. }
        | Command::Manpages { .. }
        | Command::Audit(_)
        | Command::Policy(_)
        | Command::Doctor { .. }
        | Command::Restore { .. }
        | Command::Watch(_) => Ok(()),
        Command::Status => {
            let status = c.status()?;
            out.emit(&status, || output::status(&status))
        }
        Command::Init(args) => init(c, &out, &args),
        Command::Unseal(args) => unseal(c, &out, &args),
        Command::Seal => {
            c.seal()?;
            out.emit(&json!({ "sealed": true }), || {
                "the vault is sealed: the master key is forgotten until `keyward unseal`\n".into()
            })
        }
        Command::Enroll(what) => enroll(c, &out, what),
        Command::Keyslot(KeyslotCommand::List) => {
            let keyslots = c.list_keyslots()?;
            out.emit(&json!({ "keyslots": keyslots }), || {
                output::keyslots("", &keyslots)
            })
        }
        Command::Keyslot(KeyslotCommand::Remove { id, force }) => {
            c.remove_keyslot(id, force)?;
            out.emit(&json!({ "removed": id }), || {
                format!("keyslot {id} removed\n")
            })
        }
        Command::Rekey(args) => match &args.confirm_from {
            Some(path) => confirm_recovery(c, &out, Some(path)),
            None => rekey(c, &out, &args),
        },
        Command::ConfirmRecovery { file } => confirm_recovery(c, &out, file.as_deref()),
        Command::Rotate => {
            let term = c.rotate()?;
            out.emit(&json!({ "term": term }), || {
                format!("new data-key term {term}: new secret versions are encrypted under it\n")
            })
        }
        Command::Secret(cmd) => secret(c, &out, cmd),
        Command::Key(cmd) => key(c, &out, cmd),
        Command::Transit(cmd) => transit(c, &out, cmd),
        Command::Backup { file } => super::backup::backup(c, &out, &file),
        Command::Upstream(cmd) => upstream(c, &out, cmd),
    }
}

fn upstream(c: &mut Client, out: &Out, cmd: UpstreamCommand) -> Result<(), CliError> {
    use keyward::api::{methods, Empty};
    let status = match cmd {
        UpstreamCommand::Status => c.request::<methods::UpstreamStatus>(&Empty {})?,
        UpstreamCommand::Sync => {
            let status = c.request::<methods::UpstreamSync>(&Empty {})?;
            out.emit(&status, || output::upstream(&status))?;
            return match &status.last_error {
                Some(e) => Err(CliError::Local(format!("the sync {e}"))),
                None => Ok(()),
            };
        }
        UpstreamCommand::Csr { subject, dns } => {
            let status = c.request::<methods::UpstreamStatus>(&Empty {})?;
            let key = status.key.ok_or_else(|| {
                CliError::Local("no [upstream] is configured: it names the machine key".into())
            })?;
            let name = key
                .parse()
                .map_err(|e| CliError::Local(format!("the upstream key {key:?}: {e}")))?;
            return csr_for(c, out, name, subject, dns);
        }
    };
    out.emit(&status, || output::upstream(&status))
}

/// The recovery keyslots' thresholds, in keyslot order (a rekey's shares come in that order).
fn recovery_thresholds(c: &mut Client) -> Result<Vec<u8>, CliError> {
    Ok(c.list_keyslots()?
        .iter()
        .filter(|s| s.kind == KeyslotKind::Recovery)
        .filter_map(|s| s.threshold)
        .collect())
}

fn rekey(c: &mut Client, out: &Out, args: &RekeyArgs) -> Result<(), CliError> {
    let pin = args
        .pin_file
        .as_deref()
        .map(input::read_pin_file)
        .transpose()?;
    let reply = c.rekey(pin)?;
    let thresholds = if reply.recovery_shares.is_empty() {
        Vec::new()
    } else {
        recovery_thresholds(c)?
    };
    let single = match thresholds.as_slice() {
        [k] => Some(*k),
        _ => None,
    };
    out.emit(&reply, || {
        let mut text = match &reply.pending_until {
            None => "new master key: the keyring and every keyslot are sealed again\n".to_owned(),
            Some(until) => format!(
                "new master key prepared: it takes effect once you confirm the new shares \
                 (before {until}); until then the old shares and key stay in force\n"
            ),
        };
        if !reply.recovery_shares.is_empty() {
            text.push_str(&output::recovery_shares(&reply.recovery_shares, single));
        }
        text
    })?;
    match &reply.pending_until {
        Some(until) => confirm_new_shares(
            c,
            out,
            thresholds.iter().map(|&k| u32::from(k)).sum(),
            until,
        ),
        None => Ok(()),
    }
}

/// After new shares were shown: on a terminal, ask for `needed` of them back and confirm
/// them now; otherwise say how to confirm them later.
fn confirm_new_shares(c: &mut Client, out: &Out, needed: u32, until: &str) -> Result<(), CliError> {
    let stdin = io::stdin();
    if out.json || !stdin.is_terminal() {
        if !out.json {
            eprintln!(
                "The new shares are unconfirmed until you type {needed} of them back (before \
                 {until}): `keyward confirm-recovery FILE`, one share per line."
            );
        }
        return Ok(());
    }
    eprintln!(
        "Prove the shares reached you: type {needed} of them back, one per line (not shown)."
    );
    let shares = {
        let _echo = NoEcho::stdin();
        Shares::new(ZeroizingReader::new(stdin.lock()), "stdin", true)
            .take(needed as usize)
            .collect::<Result<Vec<_>, _>>()?
    };
    let reply = c.confirm_recovery(shares).map_err(|e| {
        eprintln!("Not confirmed. Try again before {until} with `keyward confirm-recovery FILE`.");
        CliError::from(e)
    })?;
    eprintln!("{}", confirmed_text(&reply));
    Ok(())
}

fn confirmed_text(reply: &ConfirmRecoveryReply) -> String {
    let ids: Vec<String> = reply.keyslots.iter().map(|k| k.id.to_string()).collect();
    let mut text = if ids.is_empty() {
        "the shares check out; nothing was waiting for them".to_owned()
    } else {
        format!(
            "recovery shares confirmed for keyslot(s) {}",
            ids.join(", ")
        )
    };
    if reply.rekeyed {
        text.push_str("\nthe new master key is in force: the old recovery shares no longer work");
    }
    text
}

/// `confirm-recovery [FILE]` and `rekey --confirm-from FILE`: every share in the input.
fn confirm_recovery(c: &mut Client, out: &Out, file: Option<&Path>) -> Result<(), CliError> {
    let shares = match file.filter(|p| *p != Path::new("-")) {
        Some(path) => {
            let f = std::fs::File::open(path)
                .map_err(|e| CliError::Local(format!("cannot open {}: {e}", path.display())))?;
            Shares::new(ZeroizingReader::new(f), path.display().to_string(), false)
                .collect::<Result<Vec<_>, _>>()?
        }
        None => {
            let stdin = io::stdin();
            let interactive = stdin.is_terminal();
            let _echo = NoEcho::stdin();
            if interactive {
                eprintln!("Type the new recovery shares, one per line (not shown); Ctrl-D to end.");
            }
            Shares::new(ZeroizingReader::new(stdin.lock()), "stdin", interactive)
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    if shares.is_empty() {
        return Err(CliError::Usage(
            "no recovery share given: one per line, from FILE or stdin".into(),
        ));
    }
    let reply = c.confirm_recovery(shares)?;
    out.emit(&reply, || format!("{}\n", confirmed_text(&reply)))
}

fn init(c: &mut Client, out: &Out, args: &InitArgs) -> Result<(), CliError> {
    let pin = args
        .tpm2_pin_file
        .as_deref()
        .map(input::read_pin_file)
        .transpose()?;
    let pcr_public_key = args
        .pcr_public_key
        .as_deref()
        .map(input::read_public_key_pem)
        .transpose()?;
    let mut slots = Vec::new();
    for device in &args.tpm2 {
        slots.push(SlotSpec {
            device: Some(device.clone()),
            pcrs: args.pcrs.clone(),
            pin: pin.as_ref().map(|p| SecretString::new(p.expose())),
            pcr_public_key: pcr_public_key.clone(),
            signed_pcrs: args.pcr_public_key_pcrs.clone(),
            ..SlotSpec::new(KeyslotKind::Tpm2)
        });
    }
    for device in &args.pkcs11 {
        slots.push(SlotSpec {
            device: Some(device.clone()),
            ..SlotSpec::new(KeyslotKind::Pkcs11)
        });
    }
    if let Some(t) = args.recovery {
        slots.push(SlotSpec {
            threshold: Some(t.k),
            shares: Some(t.n),
            ..SlotSpec::new(KeyslotKind::Recovery)
        });
    }
    let reply = c.init(slots)?;
    let unconfirmed = reply
        .keyslots
        .iter()
        .find_map(|k| k.unconfirmed_until.clone().zip(k.threshold));
    out.emit(&reply, || {
        let mut text = format!(
            "vault initialised with {} keyslot(s):\n",
            reply.keyslots.len()
        );
        text.push_str(&output::keyslots("  ", &reply.keyslots));
        if !reply.recovery_shares.is_empty() {
            text.push_str(&output::recovery_shares(
                &reply.recovery_shares,
                args.recovery.map(|t| t.k),
            ));
        }
        text
    })?;
    match unconfirmed {
        Some((until, k)) => confirm_new_shares(c, out, u32::from(k), &until),
        None => Ok(()),
    }
}

fn enroll(c: &mut Client, out: &Out, what: Enroll) -> Result<(), CliError> {
    let (spec, threshold) = match what {
        Enroll::Tpm2 {
            device,
            pcrs,
            pin_file,
            pcr_public_key,
            pcr_public_key_pcrs,
        } => (
            SlotSpec {
                device: Some(device),
                pcrs,
                pin: pin_file.as_deref().map(input::read_pin_file).transpose()?,
                pcr_public_key: pcr_public_key
                    .as_deref()
                    .map(input::read_public_key_pem)
                    .transpose()?,
                signed_pcrs: pcr_public_key_pcrs,
                ..SlotSpec::new(KeyslotKind::Tpm2)
            },
            None,
        ),
        Enroll::Pkcs11 { device } => (
            SlotSpec {
                device: Some(device),
                ..SlotSpec::new(KeyslotKind::Pkcs11)
            },
            None,
        ),
        Enroll::Recovery { threshold, shares } => {
            super::check_threshold(threshold, shares).map_err(CliError::Usage)?;
            (
                SlotSpec {
                    threshold: Some(threshold),
                    shares: Some(shares),
                    ..SlotSpec::new(KeyslotKind::Recovery)
                },
                Some(threshold),
            )
        }
    };
    let reply = c.enroll(spec)?;
    out.emit(&reply, || {
        let mut text = "keyslot enrolled (a test unseal through it succeeded):\n".to_owned();
        text.push_str(&output::keyslots(
            "  ",
            std::slice::from_ref(&reply.keyslot),
        ));
        if !reply.recovery_shares.is_empty() {
            text.push_str(&output::recovery_shares(&reply.recovery_shares, threshold));
        }
        text
    })?;
    match reply.keyslot.unconfirmed_until.clone().zip(threshold) {
        Some((until, k)) => confirm_new_shares(c, out, u32::from(k), &until),
        None => Ok(()),
    }
}

/// Send shares one at a time until the vault opens; stop reading as soon as it does.
///
/// # Errors
/// A share that can't be read, a refusal from the daemon, no share at all (usage), or every
/// share given and the vault still sealed.
pub fn unseal_with_shares(
    shares: impl Iterator<Item = Result<SecretString, CliError>>,
    mut send: impl FnMut(SecretString) -> Result<UnsealReply, ClientError>,
    progress: &mut dyn io::Write,
) -> Result<UnsealReply, CliError> {
    let mut last = None;
    for (i, share) in shares.enumerate() {
        let reply = send(share?)?;
        if !reply.sealed {
            return Ok(reply);
        }
        let more = reply
            .shares_needed
            .map(|n| format!("{n} more needed"))
            .unwrap_or_else(|| "more needed".into());
        let _ = writeln!(progress, "share {} accepted; {more}", i + 1);
        last = Some(reply);
    }
    match last {
        None => Err(CliError::Usage(
            "no recovery share given: pipe them in one per line, or use --share-file or --pin-file"
                .into(),
        )),
        Some(reply) => Err(CliError::StillSealed {
            needed: reply.shares_needed,
        }),
    }
}

fn unseal(c: &mut Client, out: &Out, args: &UnsealArgs) -> Result<(), CliError> {
    let status = c.status()?;
    if !status.initialized {
        return Err(CliError::Client(ClientError::Api(
            keyward::api::ApiError::NotInitialized,
        )));
    }
    let reply = if !status.sealed {
        UnsealReply {
            sealed: false,
            shares_needed: None,
        }
    } else if let Some(path) = &args.pin_file {
        let pin = input::read_pin_file(path)?;
        let reply = c.unseal(UnsealParams {
            recovery_share: None,
            pin: Some(pin),
        })?;
        if reply.sealed {
            return Err(CliError::StillSealed {
                needed: reply.shares_needed,
            });
        }
        reply
    } else {
        let send = |share| {
            c.unseal(UnsealParams {
                recovery_share: Some(share),
                pin: None,
            })
        };
        let mut progress = io::stderr();
        match &args.share_file {
            Some(path) => {
                let file = std::fs::File::open(path)
                    .map_err(|e| CliError::Local(format!("cannot open {}: {e}", path.display())))?;
                let shares = Shares::new(
                    ZeroizingReader::new(file),
                    path.display().to_string(),
                    false,
                );
                unseal_with_shares(shares, send, &mut progress)?
            }
            None => {
                let stdin = io::stdin();
                let interactive = stdin.is_terminal();
                let _echo = NoEcho::stdin();
                if interactive {
                    eprintln!(
                        "The vault is sealed. Type recovery shares, one per line (not shown); \
                         Ctrl-D to stop."
                    );
                }
                let shares = Shares::new(ZeroizingReader::new(stdin), "stdin", interactive);
                unseal_with_shares(shares, send, &mut progress)?
            }
        }
    };
    let already = !status.sealed;
    out.emit(&reply, || {
        if already {
            "the vault is already unsealed\n".into()
        } else {
            "the vault is unsealed\n".into()
        }
    })
}

fn secret(c: &mut Client, out: &Out, cmd: SecretCommand) -> Result<(), CliError> {
    match cmd {
        SecretCommand::Put { name, file } => {
            let value = input::file_or_stdin(
                file.as_deref(),
                MAX_SECRET_LEN,
                "the secret value",
                "pipe it in (`keyward secret put NAME < FILE`) or use --file FILE",
            )?;
            // Bytes are kept exactly; a person piping `echo` in is told about the newline.
            if value.last() == Some(&b'\n') && io::stderr().is_terminal() {
                eprintln!(
                    "note: the value ends with a newline, which is stored as part of it \
                     (use `printf %s` or `echo -n` to leave it out)"
                );
            }
            let version = c.put_secret(&name, &value)?;
            out.emit(&json!({ "name": name, "version": version }), || {
                format!("stored {name} version {version}\n")
            })
        }
        SecretCommand::Get {
            name,
            version,
            output,
        } => {
            let reply = c.get_secret(&name, version)?;
            if let Some(path) = &output {
                input::write_private(path, reply.value.expose())?;
            }
            if out.json {
                #[derive(Serialize)]
                struct Doc<'a> {
                    name: &'a str,
                    version: u64,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    value: Option<&'a SecretValue>,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    output: Option<&'a Path>,
                }
                let doc = Doc {
                    name: &name,
                    version: reply.version,
                    value: output.is_none().then_some(&reply.value),
                    output: output.as_deref(),
                };
                out.emit(&doc, String::new)
            } else if output.is_none() {
                write_stdout(reply.value.expose())
            } else {
                Ok(())
            }
        }
        SecretCommand::List { prefix } => {
            let names = c.list_secrets(prefix.as_deref())?;
            out.emit(&json!({ "names": names }), || {
                names.iter().map(|n| format!("{n}\n")).collect()
            })
        }
        SecretCommand::Versions { name } => {
            let versions = c.secret_versions(&name)?;
            out.emit(&json!({ "name": name, "versions": versions }), || {
                output::versions(&versions)
            })
        }
        SecretCommand::Delete { name } => {
            c.delete_secret(&name)?;
            out.emit(&json!({ "deleted": name }), || {
                format!("secret {name} deleted\n")
            })
        }
    }
}

/// The OpenSSH line of key `name` whose SubjectPublicKeyInfo is `public`; its algorithm comes
/// from the key list (an RSA key's SPKI does not say which padding the key is for).
fn ssh_line(c: &mut Client, name: &str, public: &[u8]) -> Result<String, CliError> {
    let algorithm = key_algorithm(c, name)?;
    let line = keyward::ssh::public_key_line(algorithm, public, name)
        .map_err(|e| CliError::Usage(format!("key {name}: {e}")))?;
    Ok(line + "\n")
}

/// Key `name`'s algorithm, from the key list: its SPKI alone does not say (an RSA key's does
/// not name its padding).
fn key_algorithm(c: &mut Client, name: &str) -> Result<KeyAlgorithm, CliError> {
    c.list_keys()?
        .into_iter()
        .find(|k| k.name == name)
        .map(|k| k.algorithm)
        .ok_or_else(|| CliError::Usage(format!("key {name} is not in the key list")))
}

/// A PKCS#10 request for key `name`, signed inside its device (`key csr`, `upstream csr`).
fn csr_for(
    c: &mut Client,
    out: &Out,
    name: KeyName,
    subject: x509_cert::name::Name,
    dns: Vec<der::asn1::Ia5String>,
) -> Result<(), CliError> {
    // PublicKey first: it needs the same `sign` right as Sign, so a caller without it gets the
    // daemon's PermissionDenied (the key list would just leave the key out).
    let public = c.public_key(&name)?;
    let algorithm = key_algorithm(c, &name)?;
    let usage = |e: csr::CsrError| CliError::Usage(format!("key {name}: {e}"));
    let subject_text = subject.to_string();
    let unsigned = csr::Unsigned::new(algorithm, subject, &public, &dns).map_err(usage)?;
    let signature = c.sign(&name, &unsigned.to_be_signed().map_err(usage)?, false)?;
    let pem = unsigned.finish(&signature).map_err(usage)?;
    out.emit(
        &json!({ "name": name, "subject": subject_text, "csr": pem }),
        || pem.clone(),
    )
}

fn key(c: &mut Client, out: &Out, cmd: KeyCommand) -> Result<(), CliError> {
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine as _;
    match cmd {
        KeyCommand::Create {
            name,
            device,
            algorithm,
        } => {
            let der = c.create_key(&name, &device, algorithm)?;
            let pem = keyward::text::public_key_pem(&der);
            out.emit(
                &json!({ "name": name, "device": device, "algorithm": algorithm,
                         "public_key": B64.encode(&der), "pem": pem }),
                || pem.clone(),
            )
        }
        KeyCommand::List => {
            let keys = c.list_keys()?;
            out.emit(&json!({ "keys": keys }), || output::keys(&keys))
        }
        KeyCommand::Public {
            name,
            der,
            ssh,
            output,
        } => {
            let public = c.public_key(&name)?;
            let pem = keyward::text::public_key_pem(&public);
            let ssh = if ssh {
                Some(ssh_line(c, &name, &public)?)
            } else {
                None
            };
            let bytes = if let Some(line) = &ssh {
                line.clone().into_bytes()
            } else if der {
                public.clone()
            } else {
                pem.clone().into_bytes()
            };
            if let Some(path) = &output {
                input::write_public(path, &bytes)?;
            }
            if out.json {
                out.emit(
                    &json!({ "name": name, "public_key": B64.encode(&public), "pem": pem,
                             "ssh": ssh.as_deref().map(str::trim_end) }),
                    String::new,
                )
            } else if output.is_none() {
                write_stdout(&bytes)
            } else {
                Ok(())
            }
        }
        KeyCommand::Sign {
            name,
            file,
            prehashed,
            hash,
            output,
        } => {
            let what = if prehashed {
                "the digest"
            } else {
                "the data to sign"
            };
            let data = input::file_or_stdin(
                file.as_deref(),
                MAX_SIGN_INPUT,
                what,
                "pipe it in (`keyward key sign NAME < FILE`) or use --file FILE",
            )
            .map_err(|e| match e {
                CliError::Local(m) if m.contains("larger than") => CliError::Local(format!(
                    "{m}: sign its SHA-256 digest with --prehashed instead"
                )),
                e => e,
            })?;
            let signature = c.sign_with(&name, &data, prehashed, hash)?;
            if let Some(path) = &output {
                input::write_public(path, &signature)?;
            }
            if out.json {
                out.emit(
                    &json!({ "name": name, "signature": B64.encode(&signature) }),
                    String::new,
                )
            } else if output.is_none() {
                write_stdout(&signature)
            } else {
                Ok(())
            }
        }
        KeyCommand::Csr { name, subject, dns } => csr_for(c, out, name, subject, dns),
        KeyCommand::Delete { name } => {
            c.delete_key(&name)?;
            out.emit(&json!({ "deleted": name }), || {
                format!("key {name} deleted\n")
            })
        }
        KeyCommand::Attest {
            name,
            nonce,
            output,
        } => super::attest::attest(c, out, name, nonce, output.as_deref()),
        // Answered offline in `run`.
        KeyCommand::VerifyAttestation { .. } => Ok(()),
    }
}

fn transit(c: &mut Client, out: &Out, cmd: TransitCommand) -> Result<(), CliError> {
    use keyward::api::{methods, Bytes, DecryptParams, EncryptParams, TransitKeyParams};
    let associated = |text: Option<String>| text.map(|t| Bytes(t.into_bytes()));
    match cmd {
        TransitCommand::Create { name } => {
            let version = c
                .request::<methods::CreateTransitKey>(&TransitKeyParams { name: name.clone() })?
                .version;
            out.emit(&json!({ "name": name, "version": version }), || {
                format!("transit key {name} created (version {version})\n")
            })
        }
        TransitCommand::Rotate { name } => {
            let version = c
                .request::<methods::RotateTransitKey>(&TransitKeyParams { name: name.clone() })?
                .version;
            out.emit(&json!({ "name": name, "version": version }), || {
                format!("transit key {name} now encrypts with version {version}\n")
            })
        }
        TransitCommand::Encrypt {
            name,
            file,
            associated_data,
        } => {
            let plaintext = input::file_or_stdin(
                file.as_deref(),
                MAX_SECRET_LEN,
                "the data to encrypt",
                "pipe it in (`keyward transit encrypt NAME < FILE`) or use --file FILE",
            )?;
            let reply = c.request::<methods::Encrypt>(&EncryptParams {
                name: name.clone(),
                plaintext: SecretValue::from(plaintext),
                associated_data: associated(associated_data),
            })?;
            out.emit(
                &json!({ "name": name, "ciphertext": reply.ciphertext }),
                || format!("{}\n", reply.ciphertext),
            )
        }
        TransitCommand::Decrypt {
            name,
            ciphertext,
            associated_data,
            output,
        } => {
            let reply = c.request::<methods::Decrypt>(&DecryptParams {
                name: name.clone(),
                ciphertext,
                associated_data: associated(associated_data),
            })?;
            if let Some(path) = &output {
                input::write_private(path, reply.plaintext.expose())?;
            }
            if out.json {
                #[derive(Serialize)]
                struct Doc<'a> {
                    name: &'a str,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    plaintext: Option<&'a SecretValue>,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    output: Option<&'a Path>,
                }
                let doc = Doc {
                    name: &name,
                    plaintext: output.is_none().then_some(&reply.plaintext),
                    output: output.as_deref(),
                };
                out.emit(&doc, String::new)
            } else if output.is_none() {
                write_stdout(reply.plaintext.expose())
            } else {
                Ok(())
            }
        }
    }
}

/// `keyward doctor` and `keyward restore` are keywardd's work (its config parser, device code,
/// policy loader and schema), so run `keywardd ARGS` in this process's place: its output and
/// exit code are the command's. keywardd is looked for beside this binary (a build tree, a
/// hand install), then where the package puts it (`/usr/sbin`, often not on a user's PATH),
/// then on PATH.
fn exec_keywardd(args: &[&std::ffi::OsStr]) -> Result<(), CliError> {
    use std::os::unix::process::CommandExt as _;
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("keywardd")));
    let program = beside
        .into_iter()
        .chain([std::path::PathBuf::from("/usr/sbin/keywardd")])
        .find(|p| p.is_file())
        .unwrap_or_else(|| "keywardd".into());
    let e = std::process::Command::new(&program).args(args).exec();
    Err(CliError::Local(format!(
        "cannot run {}: {e}",
        program.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyward::api::ApiError;

    /// Share `i` of a 2-of-n test set.
    fn share(i: u8) -> String {
        keyward::recovery_share::render(&[0x5E, 0x70, 0x1D, 0x00], 2, i, &[i; 32]).to_string()
    }

    /// A share that reads, of a set the daemon stand-in does not know.
    fn stranger() -> String {
        keyward::recovery_share::render(&[0xFF; 4], 2, 1, &[7; 32]).to_string()
    }

    fn shares(text: &str) -> Shares<io::Cursor<Vec<u8>>> {
        Shares::new(io::Cursor::new(text.as_bytes().to_vec()), "test", false)
    }

    /// A daemon stand-in that opens after `k` shares, and refuses the [`stranger`].
    fn daemon(
        k: u8,
        seen: &mut Vec<String>,
    ) -> impl FnMut(SecretString) -> Result<UnsealReply, ClientError> + '_ {
        move |share| {
            if share.expose() == stranger() {
                return Err(ClientError::Api(ApiError::InvalidArgument {
                    parameter: "recovery_share".into(),
                    reason: "this share belongs to no recovery keyslot of this vault".into(),
                }));
            }
            seen.push(share.expose().to_owned());
            let left = k.saturating_sub(seen.len() as u8);
            Ok(UnsealReply {
                sealed: left > 0,
                shares_needed: (left > 0).then_some(left),
            })
        }
    }

    #[test]
    fn shares_are_sent_until_the_vault_opens_and_no_further() {
        let mut seen = Vec::new();
        let mut progress = Vec::new();
        let reply = unseal_with_shares(
            shares(&format!("{}\n\n{}\n{}\n", share(1), share(2), share(3))),
            daemon(2, &mut seen),
            &mut progress,
        )
        .unwrap();
        assert!(!reply.sealed);
        assert_eq!(
            seen,
            [share(1), share(2)],
            "the third share is never read or sent"
        );
        let progress = String::from_utf8(progress).unwrap();
        assert_eq!(progress, "share 1 accepted; 1 more needed\n");
    }

    #[test]
    fn too_few_shares_leave_it_sealed_with_exit_code_4() {
        let mut seen = Vec::new();
        let e = unseal_with_shares(
            shares(&format!("{}\n", share(1))),
            daemon(3, &mut seen),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(
            matches!(e, CliError::StillSealed { needed: Some(2) }),
            "{e:?}"
        );
        assert_eq!(e.exit_code(), 4);
        assert!(e.to_string().contains("2 more"), "{e}");
    }

    #[test]
    fn no_share_is_a_usage_error_and_a_refused_share_stops_the_loop() {
        let mut seen = Vec::new();
        let e =
            unseal_with_shares(shares("\n"), daemon(2, &mut seen), &mut Vec::new()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = unseal_with_shares(
            shares(&format!("{}\n{}\n", stranger(), share(2))),
            daemon(2, &mut seen),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().contains("no recovery keyslot"), "{e}");
        assert!(seen.is_empty(), "nothing after the refused share was sent");
    }

    #[test]
    fn a_mistyped_share_is_not_sent_and_stops_the_loop() {
        let mut seen = Vec::new();
        let typo = share(2).replacen("-5E701D00-2-2-", "-5E701D00-2-3-", 1);
        let e = unseal_with_shares(
            shares(&format!("{}\n{typo}\n{}\n", share(1), share(3))),
            daemon(3, &mut seen),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        assert!(e.to_string().contains("share 2 not sent"), "{e}");
        assert_eq!(seen, [share(1)], "only the share before it was sent");
    }

    #[test]
    fn manpages_cover_every_visible_subcommand_and_not_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("man1");
        manpages(&out).unwrap();
        let page = std::fs::read_to_string(out.join("keyward-secret-put.1")).unwrap();
        assert!(page.starts_with(".ie \\n(.g .ds Aq"), "roff: {page:.80}");
        assert!(page.contains("KEYWARD_SOCKET"), "the env var is documented");
        let main = std::fs::read_to_string(out.join("keyward.1")).unwrap();
        assert!(main.contains("Exit codes:"), "after_help is in keyward(1)");
        // One page per subcommand at every level, and none for the hidden generator itself.
        let mut expected = vec!["keyward.1".to_owned()];
        for sub in Cli::command()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
        {
            expected.push(format!("keyward-{}.1", sub.get_name()));
            for leaf in sub.get_subcommands() {
                expected.push(format!("keyward-{}-{}.1", sub.get_name(), leaf.get_name()));
            }
        }
        let mut written: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        expected.sort();
        written.sort();
        assert_eq!(written, expected);
        assert!(!written.iter().any(|n| n.contains("manpages")));
        let help = Cli::command().render_help().to_string();
        assert!(!help.contains("manpages"), "hidden from --help");
    }
}
