//! [`Invalid`]: a value the contract refuses (a bad name, an unknown algorithm), and how that
//! refusal survives being carried through serde.
//!
//! The contract's checked types ([`crate::names`], [`crate::kinds`]) refuse bad values while a
//! request is parsed, before policy or audit see it. A caller must still learn *why* and
//! *which parameter* (`InvalidArgument`), not just that the parameters did not fit
//! (`InvalidParameter`). serde only carries a message, so a refusal is written into it behind a
//! marker and read back by [`Invalid::from_serde`] — here, in one place, with a test.
//!
//! Must not: quote the refused value when it may be secret (names and kinds are not).

/// Where a refusal starts inside a serde message. Readable, in case a message reaches a person
/// some other way.
const MARK: &str = "invalid argument ";

/// A value the contract refuses: the parameter it was given as, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Invalid {
    /// The parameter's name on the wire (`name`, `algorithm`, `kind`).
    pub parameter: &'static str,
    /// Why, for a person.
    pub reason: String,
}

impl Invalid {
    /// A refusal of `parameter`.
    pub fn new(parameter: &'static str, reason: impl Into<String>) -> Self {
        Self {
            parameter,
            reason: reason.into(),
        }
    }

    /// The refusal as a serde error, for a checked type's `Deserialize`.
    pub(crate) fn into_serde<E: serde::de::Error>(self) -> E {
        E::custom(format_args!("{MARK}{}: {}", self.parameter, self.reason))
    }

    /// The refusal inside a serde_json error, if that is what it carries. The parameter comes
    /// back as written by [`Invalid::into_serde`]; the position serde_json appends is dropped.
    pub(crate) fn from_serde(e: &serde_json::Error) -> Option<(String, String)> {
        let message = e.to_string();
        let position = format!(" at line {} column {}", e.line(), e.column());
        let message = message.strip_suffix(&position).unwrap_or(&message);
        let (parameter, reason) = message.strip_prefix(MARK)?.split_once(": ")?;
        Some((parameter.to_owned(), reason.to_owned()))
    }
}

/// Deserialize a checked type from its string form: the string is read, then refused or
/// accepted by `T`'s `TryFrom<String>`.
pub(crate) fn deserialize_checked<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<String, Error = Invalid>,
{
    let s = <String as serde::Deserialize>::deserialize(d)?;
    T::try_from(s).map_err(Invalid::into_serde)
}

/// Implements `Display`, `Serialize`, `Deserialize` (through `TryFrom<String>`), `FromStr` and
/// `AsRef<str>` for a checked type with an `as_str`.
macro_rules! checked_text {
    ($t:ty) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                $crate::invalid::deserialize_checked(d)
            }
        }
        impl std::str::FromStr for $t {
            type Err = $crate::invalid::Invalid;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::try_from(s.to_owned())
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }
    };
}
pub(crate) use checked_text;
