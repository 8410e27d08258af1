//! The grammar of secret and key names, checked before anything touches the store or a device.
//!
//! A name is 1 to 255 bytes of `/`-separated segments; each segment is 1 or more of
//! `A-Z a-z 0-9 . _ - @ + =`, and is not `.` or `..`. So names are safe in paths, logs, globs
//! and systemd credential ids, and `db/password` reads like the path it looks like.

use crate::error::{invalid, Error, Param};

/// Longest secret name, in bytes.
pub const MAX_SECRET_NAME: usize = 255;
/// Longest key name, in bytes.
pub const MAX_KEY_NAME: usize = 128;

fn check(parameter: Param, name: &str, max: usize) -> Result<(), Error> {
    let bad = |reason: String| invalid(parameter, reason);
    if name.is_empty() || name.len() > max {
        return Err(bad(format!(
            "a name is 1 to {max} bytes, not {}",
            name.len()
        )));
    }
    for segment in name.split('/') {
        if segment.is_empty() {
            return Err(bad(
                "empty path segment (leading, trailing or double '/')".into()
            ));
        }
        if segment == "." || segment == ".." {
            return Err(bad("'.' and '..' are not names".into()));
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "._-@+=".contains(*c)))
        {
            return Err(bad(format!(
                "{c:?} is not allowed: use A-Z a-z 0-9 . _ - @ + = and '/' between segments"
            )));
        }
    }
    Ok(())
}

/// Check a secret name.
///
/// # Errors
/// [`Error::InvalidArgument`] naming what is wrong.
pub fn check_secret_name(name: &str) -> Result<(), Error> {
    check(Param::Name, name, MAX_SECRET_NAME)
}

/// Check a key name.
///
/// # Errors
/// [`Error::InvalidArgument`] naming what is wrong.
pub fn check_key_name(name: &str) -> Result<(), Error> {
    check(Param::Name, name, MAX_KEY_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        for ok in [
            "db",
            "db/password",
            "prod/db-1/pass_word.v2",
            "a@b+c=d",
            &"x".repeat(255),
        ] {
            assert!(check_secret_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/db",
            "db/",
            "a//b",
            "..",
            "a/./b",
            "a b",
            "a\nb",
            "ä",
            "a*",
            &"x".repeat(256),
        ] {
            assert!(check_secret_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_key_name(&"k".repeat(129)).is_err());
    }
}
