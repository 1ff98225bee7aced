//! Keeping secrets out of what claygate says about an upstream.
//!
//! Secrets reach a policy only through `${env:…}` references (DESIGN.md:
//! "secrets only via env"), in an upstream's `base_url` (path, query or
//! user info) and headers and in an operation's headers. Compile collects
//! the values the environment gave those references into [`Secrets`], and
//! everything claygate repeats from an upstream (an error body answered,
//! stored for replay or dead-lettered; a transport message; a probe's
//! detail) goes through [`Secrets::scrub_str`] or
//! [`Secrets::scrub_bytes`] first. Credentials written into the policy
//! itself count too: a base URL's password and a literal `Authorization`
//! or `Proxy-Authorization` value. Nothing else is scrubbed: literal policy
//! text (`X-Api-Version: 2024`, the `Bearer ` of a template) is no secret,
//! and scrubbing it would mangle answers (`{"id":120245}` into invalid
//! JSON) for nothing.

use std::sync::Arc;

/// Shortest secret scrubbed, in bytes: shorter values (a region code, a
/// version) match innocent text far too often, and are no credential.
pub const MIN_SECRET: usize = 8;

/// What replaces a scrubbed secret.
pub const REDACTED: &str = "[redacted]";

/// Whether a header of this name carries a credential, whatever wrote its
/// value (`Authorization`, `Proxy-Authorization`; any case).
pub fn is_credential_header(name: &str) -> bool {
    name.eq_ignore_ascii_case("authorization") || name.eq_ignore_ascii_case("proxy-authorization")
}

/// The secret values of an upstream's or an operation's requests, longest
/// first, so a value is scrubbed before a word inside it. Never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(Arc<[String]>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} values)", self.0.len())
    }
}

impl Secrets {
    /// The secrets among `values` (values the environment gave, a URL's
    /// password): each trimmed value of at least [`MIN_SECRET`] bytes, and
    /// each whitespace-separated word of one that long (`Bearer abc…` in
    /// one variable: the token may be echoed alone).
    pub fn new(values: impl IntoIterator<Item = String>) -> Secrets {
        let mut secrets = Vec::new();
        for value in values {
            let value = value.trim();
            if value.len() >= MIN_SECRET {
                secrets.push(value.to_owned());
            }
            secrets.extend(
                value
                    .split_whitespace()
                    .filter(|w| w.len() >= MIN_SECRET && *w != value)
                    .map(str::to_owned),
            );
        }
        Secrets::sorted(secrets)
    }

    /// The secrets of both.
    pub fn merge(&self, other: &Secrets) -> Secrets {
        Secrets::sorted(self.0.iter().chain(other.0.iter()).cloned().collect())
    }

    fn sorted(mut secrets: Vec<String>) -> Secrets {
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        Secrets(secrets.into())
    }

    /// True when there is nothing to scrub.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `text` is one of the secrets (for tests and checks; the
    /// values themselves are never handed out).
    pub fn contains(&self, text: &str) -> bool {
        self.0.iter().any(|s| s == text)
    }

    /// `text` with every secret replaced by [`REDACTED`].
    pub fn scrub_str(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in self.0.iter() {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), REDACTED);
            }
        }
        out
    }

    /// `bytes` (a body, perhaps not UTF-8) with every secret replaced by
    /// [`REDACTED`]; `None` when it holds none.
    pub fn scrub_bytes(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        for secret in self.0.iter() {
            let current = out.as_deref().unwrap_or(bytes);
            if let Some(scrubbed) = replace_bytes(current, secret.as_bytes(), REDACTED.as_bytes()) {
                out = Some(scrubbed);
            }
        }
        out
    }
}

/// `haystack` with every `needle` replaced by `with`; `None` when it has none.
fn replace_bytes(haystack: &[u8], needle: &[u8], with: &[u8]) -> Option<Vec<u8>> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    let mut out = Vec::new();
    let mut rest = haystack;
    let mut found = false;
    while let Some(at) = rest.windows(needle.len()).position(|w| w == needle) {
        found = true;
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(with);
        rest = &rest[at + needle.len()..];
    }
    if !found {
        return None;
    }
    out.extend_from_slice(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_bytes_replaces_every_occurrence_or_answers_none() {
        assert_eq!(
            replace_bytes(b"a-key-b-key", b"key", b"X"),
            Some(b"a-X-b-X".to_vec())
        );
        assert_eq!(replace_bytes(b"nothing", b"key", b"X"), None);
        assert_eq!(replace_bytes(b"k", b"key", b"X"), None);
        assert_eq!(replace_bytes(b"key", b"", b"X"), None);
        assert_eq!(
            replace_bytes(b"\xffkey\xfe", b"key", b"X"),
            Some(b"\xffX\xfe".to_vec())
        );
    }

    #[test]
    fn values_and_their_long_words_are_secrets_short_ones_are_not() {
        let secrets = Secrets::new([
            "Bearer sk-live-0123456789".to_owned(),
            "2024".to_owned(),
            "  hunter22 ".to_owned(),
            String::new(),
        ]);
        assert!(secrets.contains("Bearer sk-live-0123456789"));
        assert!(secrets.contains("sk-live-0123456789"), "the token alone");
        assert!(secrets.contains("hunter22"), "trimmed, 8 bytes");
        assert!(!secrets.contains("Bearer"), "a short word is no secret");
        assert!(!secrets.contains("2024"));
        assert_eq!(
            secrets.scrub_str("got Bearer sk-live-0123456789, sk-live-0123456789, id 2024"),
            "got [redacted], [redacted], id 2024"
        );
        assert_eq!(
            secrets.scrub_bytes(br#"{"id":120245,"k":"hunter22"}"#),
            Some(br#"{"id":120245,"k":"[redacted]"}"#.to_vec())
        );
        assert_eq!(secrets.scrub_bytes(br#"{"id":120245}"#), None);
        assert!(Secrets::new(["short".to_owned()]).is_empty());
        let merged = secrets.merge(&Secrets::new(["another-secret".to_owned()]));
        assert!(merged.contains("another-secret") && merged.contains("hunter22"));
        assert_eq!(format!("{merged:?}"), "Secrets(4 values)", "never printed");
    }
}
