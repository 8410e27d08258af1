//! Secret and key names: [`SecretName`] and [`KeyName`], checked when they are made, so a
//! request that names something has a valid name before policy, audit, the store or a device
//! sees it, and the CLI refuses a bad name before it sends anything.
//!
//! A name is 1 to 255 bytes (keys: 128) of `/`-separated segments; each segment is 1 or more of
//! `A-Z a-z 0-9 . _ - @ + =`, and is not `.` or `..`. So names are safe in paths, logs, globs
//! and systemd credential ids, and `db/password` reads like the path it looks like.
//!
//! Must not: accept a name another part of Keyward would have to check again.

use crate::invalid::{checked_text, Invalid};

/// Longest secret name, in bytes.
pub const MAX_SECRET_NAME: usize = 255;
/// Longest key name, in bytes.
pub const MAX_KEY_NAME: usize = 128;

/// Why `name` is not a name of at most `max` bytes (of one segment, if `one_segment`), if it
/// isn't.
fn refuse(name: &str, max: usize, one_segment: bool) -> Option<String> {
    if name.is_empty() || name.len() > max {
        return Some(format!("a name is 1 to {max} bytes, not {}", name.len()));
    }
    if one_segment && name.contains('/') {
        return Some("this name is one segment: no '/'".into());
    }
    for segment in name.split('/') {
        if segment.is_empty() {
            return Some("empty path segment (leading, trailing or double '/')".into());
        }
        if segment == "." || segment == ".." {
            return Some("'.' and '..' are not names".into());
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "._-@+=".contains(*c)))
        {
            return Some(format!(
                "{c:?} is not allowed: use A-Z a-z 0-9 . _ - @ + = and '/' between segments"
            ));
        }
    }
    None
}

macro_rules! name_type {
    ($(#[$doc:meta])* $t:ident, $max:expr, $one_segment:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $t(String);

        impl $t {
            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $t {
            type Error = Invalid;
            fn try_from(name: String) -> Result<Self, Invalid> {
                match refuse(&name, $max, $one_segment) {
                    Some(reason) => Err(Invalid::new("name", reason)),
                    None => Ok(Self(name)),
                }
            }
        }

        impl TryFrom<&str> for $t {
            type Error = Invalid;
            fn try_from(name: &str) -> Result<Self, Invalid> {
                Self::try_from(name.to_owned())
            }
        }

        impl From<$t> for String {
            fn from(name: $t) -> String {
                name.0
            }
        }

        impl std::ops::Deref for $t {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        checked_text!($t);
    };
}

name_type!(
    /// The name of a secret (`db/password`): at most [`MAX_SECRET_NAME`] bytes.
    SecretName,
    MAX_SECRET_NAME,
    false
);
name_type!(
    /// The name of a signing key: at most [`MAX_KEY_NAME`] bytes.
    KeyName,
    MAX_KEY_NAME,
    false
);
name_type!(
    /// The name of a transit key: a key name of one segment, so that it is one segment of the
    /// transit socket's URL path (`/v1/<mount>/encrypt/<name>`), as OpenBao's key names are.
    TransitKeyName,
    MAX_KEY_NAME,
    true
);

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
            assert_eq!(
                SecretName::try_from(ok).map(String::from).as_deref(),
                Ok(ok)
            );
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
            let e = SecretName::try_from(bad).unwrap_err();
            assert_eq!(e.parameter, "name", "{bad:?}");
        }
        assert!(KeyName::try_from("k".repeat(128)).is_ok());
        assert!(KeyName::try_from("k".repeat(129)).is_err());
        assert!(TransitKeyName::try_from("bao-unseal").is_ok());
        assert!(TransitKeyName::try_from("a/b").is_err());
        assert!(TransitKeyName::try_from("").is_err());
    }

    #[test]
    fn serde_checks_and_keeps_the_reason() {
        let e = serde_json::from_str::<SecretName>(r#""a b""#).unwrap_err();
        let (parameter, reason) = Invalid::from_serde(&e).unwrap();
        assert_eq!(parameter, "name");
        assert_eq!(
            reason,
            "' ' is not allowed: use A-Z a-z 0-9 . _ - @ + = and '/' between segments"
        );
        // Not a refusal: a string was expected.
        let e = serde_json::from_str::<SecretName>("7").unwrap_err();
        assert_eq!(Invalid::from_serde(&e), None);
        let name: KeyName = serde_json::from_str(r#""ci/deploy""#).unwrap();
        assert_eq!(serde_json::to_string(&name).unwrap(), r#""ci/deploy""#);
    }
}
