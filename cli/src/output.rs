//! What the CLI prints: compact tables for people, one JSON document for scripts (`--json`),
//! PEM for public keys, and the once-only recovery share notice.
//!
//! Secret values are written raw to stdout or a file only by the commands that fetch them;
//! nothing here logs them.

use std::fmt::Write as _;

use keyward::api::{
    DeviceStatus, KeyInfo, Keyslot, SecretString, SecretVersion, StatusReply, UpstreamStatusReply,
};

/// Columns padded to their widest cell, two spaces apart, indented by `indent`.
pub fn table(indent: &str, header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::from(indent);
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let width = widths.get(i).copied().unwrap_or(0);
            let _ = write!(text, "{cell:<width$}");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn or_dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".into())
}

fn pcr_list(pcrs: &[u8]) -> String {
    pcrs.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
}

/// A keyslot's literal PCRs, and its signed ones with the key's fingerprint (as systemd
/// prints `pkfp`, shortened).
fn slot_pcrs(s: &Keyslot) -> Option<String> {
    let literal = s.pcrs.as_deref().filter(|p| !p.is_empty()).map(pcr_list);
    let signed = s.signed_pcrs.as_deref().map(|p| {
        let key = s.pcr_public_key.as_deref().unwrap_or("?");
        format!("{} signed by {}", pcr_list(p), key.get(..12).unwrap_or(key))
    });
    match (literal, signed) {
        (Some(l), Some(s)) => Some(format!("{l} + {s}")),
        (l, s) => l.or(s),
    }
}

/// The keyslots as a table.
pub fn keyslots(indent: &str, slots: &[Keyslot]) -> String {
    let rows: Vec<Vec<String>> = slots
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.kind.to_string(),
                or_dash(s.device.clone()),
                or_dash(slot_pcrs(s)),
                if s.pin { "yes" } else { "no" }.into(),
                or_dash(match (s.threshold, s.shares, &s.unconfirmed_until) {
                    (Some(k), Some(n), None) => Some(format!("{k} of {n}")),
                    (Some(k), Some(n), Some(until)) => {
                        Some(format!("{k} of {n}, unconfirmed until {until}"))
                    }
                    _ => None,
                }),
                s.created.clone(),
            ]
        })
        .collect();
    table(
        indent,
        &["ID", "KIND", "DEVICE", "PCRS", "PIN", "SHARES", "CREATED"],
        &rows,
    )
}

fn devices(indent: &str, devices: &[DeviceStatus]) -> String {
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            vec![
                d.name.clone(),
                d.kind.to_string(),
                if d.available { "yes" } else { "NO" }.into(),
                if d.algorithms.is_empty() {
                    "-".into()
                } else {
                    d.algorithms
                        .iter()
                        .map(|a| a.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                },
                d.detail.clone(),
            ]
        })
        .collect();
    table(
        indent,
        &["NAME", "KIND", "AVAILABLE", "CREATES", "DETAIL"],
        &rows,
    )
}

/// `keyward status` for people.
pub fn status(s: &StatusReply) -> String {
    let mut out = String::new();
    let state = if !s.initialized {
        "not initialised: run `keyward init`".to_owned()
    } else if s.sealed {
        format!(
            "SEALED: {}",
            s.reason
                .as_deref()
                .unwrap_or("no keyslot has unsealed it yet")
        )
    } else {
        match &s.unsealed_by {
            Some(by) => format!("unsealed by {by}"),
            None => "unsealed".to_owned(),
        }
    };
    let _ = writeln!(out, "vault:    {state}");
    if let Some(n) = s.shares_pending {
        let _ = writeln!(
            out,
            "          {n} more recovery share(s) needed: `keyward unseal`"
        );
    }
    if let Some(until) = &s.rekey_pending_until {
        let _ = writeln!(
            out,
            "rekey:    PENDING until {until}: the new master key takes effect once its shares \
             are confirmed (`keyward confirm-recovery`)"
        );
    }
    if let Some(term) = s.term {
        let _ = writeln!(out, "term:     {term}");
    }
    let _ = writeln!(out, "daemon:   keywardd {}", s.version);
    if let Some(key) = &s.audit_public_key {
        let _ = writeln!(out, "audit:    {key} (audit log signing key)");
    }
    if let Some(finding) = &s.audit_finding {
        let _ = writeln!(out, "AUDIT LOG DID NOT MATCH ITS ANCHOR: {finding}");
    }
    if let Some(storage) = &s.storage {
        let _ = writeln!(out, "STORAGE:  {storage}");
    }
    if s.devices.is_empty() {
        let _ = writeln!(out, "devices:  none configured");
    } else {
        let _ = writeln!(out, "devices:");
        out.push_str(&devices("  ", &s.devices));
    }
    if s.initialized {
        if s.keyslots.is_empty() {
            let _ = writeln!(out, "keyslots: none");
        } else {
            let _ = writeln!(out, "keyslots:");
            out.push_str(&keyslots("  ", &s.keyslots));
        }
    }
    out
}

/// The once-only notice for new recovery shares. `threshold` is how many open the vault.
pub fn recovery_shares(shares: &[SecretString], threshold: Option<u8>) -> String {
    let mut out = String::new();
    let needed = match threshold {
        Some(k) => format!("Any {k} of these {} shares", shares.len()),
        None => "These shares".to_owned(),
    };
    let _ = writeln!(
        out,
        "\nRECOVERY SHARES: shown this once; Keyward keeps no copy.\n\
         {needed} unseal the vault when no device can. Store each share\n\
         apart from the others (different people or places, none next to this machine).\n\
         To use them: `keyward unseal`, one share per line."
    );
    for (i, share) in shares.iter().enumerate() {
        let _ = writeln!(out, "  share {}: {}", i + 1, share.expose());
    }
    out
}

/// Secret versions as a table.
pub fn versions(versions: &[SecretVersion]) -> String {
    let rows: Vec<Vec<String>> = versions
        .iter()
        .map(|v| vec![v.version.to_string(), v.term.to_string(), v.created.clone()])
        .collect();
    table("", &["VERSION", "TERM", "CREATED"], &rows)
}

/// Keys as a table.
pub fn keys(keys: &[KeyInfo]) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.name.clone(),
                k.device.clone(),
                k.algorithm.to_string(),
                k.created.clone(),
            ]
        })
        .collect();
    table("", &["NAME", "DEVICE", "ALGORITHM", "CREATED"], &rows)
}

/// The upstream sync's status: where, how it went, and each mapped secret.
pub fn upstream(s: &UpstreamStatusReply) -> String {
    if !s.configured {
        return "no upstream: add an [upstream] table to keywardd.toml\n".into();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "upstream:      {} (role {})",
        s.address.as_deref().unwrap_or("-"),
        s.role.as_deref().unwrap_or("-")
    );
    let _ = writeln!(out, "machine key:   {}", or_dash(s.key.clone()));
    let _ = writeln!(out, "last attempt:  {}", or_dash(s.last_attempt.clone()));
    let _ = writeln!(out, "last success:  {}", or_dash(s.last_success.clone()));
    if let Some(e) = &s.last_error {
        let _ = writeln!(out, "last error:    {e}");
    }
    let _ = writeln!(
        out,
        "token ttl:     {}",
        s.token_ttl
            .map_or_else(|| "no token".into(), |t| format!("{t}s"))
    );
    let rows: Vec<Vec<String>> = s
        .mappings
        .iter()
        .map(|m| {
            vec![
                m.remote.clone(),
                m.secret.clone(),
                or_dash(m.remote_version.map(|v| v.to_string())),
                or_dash(m.local_version.map(|v| v.to_string())),
                or_dash(m.synced.clone()),
                or_dash(m.note.clone()),
            ]
        })
        .collect();
    out.push_str(&table(
        "",
        &["REMOTE", "SECRET", "REMOTE-V", "LOCAL-V", "SYNCED", "NOTE"],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(
            "  ",
            &["ID", "KIND"],
            &[
                vec!["1".into(), "tpm2".into()],
                vec!["10".into(), "recovery".into()],
            ],
        );
        assert_eq!(t, "  ID  KIND\n  1   tpm2\n  10  recovery\n");
    }

    #[test]
    fn status_says_why_it_is_sealed() {
        let s = StatusReply {
            initialized: true,
            sealed: true,
            unsealed_by: None,
            reason: Some("no keyslot could unseal: tpm: PCRs changed".into()),
            keyslots: vec![Keyslot {
                id: 1,
                kind: keyward::api::KeyslotKind::Tpm2,
                device: Some("tpm".into()),
                pcrs: Some(vec![7, 11]),
                pin: false,
                threshold: None,
                shares: None,
                created: "2025-01-01T00:00:00Z".into(),
                unconfirmed_until: None,
                signed_pcrs: None,
                pcr_public_key: None,
            }],
            devices: vec![DeviceStatus {
                name: "tpm".into(),
                kind: keyward::api::DeviceKind::Tpm2,
                available: true,
                detail: "swtpm".into(),
                algorithms: vec![keyward::api::KeyAlgorithm::EcdsaP256],
            }],
            shares_pending: Some(1),
            term: None,
            version: "0.1.0".into(),
            audit_public_key: Some("MCowBQYDK2VwAyEA".into()),
            rekey_pending_until: None,
            audit_finding: None,
            storage: Some("the file system is full".into()),
        };
        let text = status(&s);
        assert!(
            text.contains("SEALED: no keyslot could unseal: tpm: PCRs changed"),
            "{text}"
        );
        assert!(text.contains("1 more recovery share"), "{text}");
        assert!(text.contains("7,11"), "{text}");
        assert!(text.contains("audit:    MCowBQYDK2VwAyEA"), "{text}");
        assert!(text.contains("STORAGE:  the file system is full"), "{text}");
    }

    #[test]
    fn the_share_notice_lists_every_share() {
        let shares = vec![SecretString::new("a-1"), SecretString::new("b-2")];
        let text = recovery_shares(&shares, Some(2));
        assert!(text.contains("Any 2 of these 2 shares"));
        assert!(text.contains("share 1: a-1\n") && text.contains("share 2: b-2\n"));
        assert!(text.contains("apart"));
    }
}
