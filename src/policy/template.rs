//! The two small languages inside policy strings.
//!
//! - Request templates: `{{ params.email }}` placeholders in paths, query,
//!   headers and bodies, filled from the invoke params.
//! - Environment references: `${env:NAME}` and `${env:NAME:-default}` in base
//!   URLs, headers and webhooks, filled when policies are compiled, so secrets
//!   live in the environment and never in files.
//!
//! Both are parsed once here; validation checks them and compilation reuses them.

use std::fmt;

/// A part of a parsed request template.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Piece {
    /// Literal text.
    Text(String),
    /// A param, as its path below `params` (`params.row.email` is `["row", "email"]`).
    Param(Vec<String>),
}

/// A string with `{{ params.… }}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Template {
    pieces: Vec<Piece>,
}

/// Why a template or environment reference did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SyntaxError {
    /// Byte offset in the string where the problem starts.
    pub offset: usize,
    /// What is wrong.
    pub message: String,
}

impl Template {
    /// Parses `text`; `{{` opens a placeholder that must read `params.NAME(.NAME)*`.
    ///
    /// ```
    /// use claygate::policy::template::Template;
    ///
    /// let t = Template::parse("/v1/tables/{{ params.table_id }}/rows").unwrap();
    /// assert_eq!(t.params().next(), Some(&["table_id".to_owned()][..]));
    /// assert!(Template::parse("{{ email }}").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Template, SyntaxError> {
        let mut pieces = Vec::new();
        let mut rest = text;
        let mut base = 0;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after.find("}}").ok_or_else(|| SyntaxError {
                offset: base + open,
                message: "unclosed placeholder: `{{` without `}}`".to_owned(),
            })?;
            let inner = after[..close].trim();
            let path = parse_param_path(inner).ok_or_else(|| SyntaxError {
                offset: base + open,
                message: format!(
                    "placeholder `{{{{ {inner} }}}}` must name a param, like `{{{{ params.email }}}}`"
                ),
            })?;
            pieces.push(Piece::Param(path));
            let consumed = open + 2 + close + 2;
            base += consumed;
            rest = &rest[consumed..];
        }
        if let Some(stray) = rest.find("}}") {
            return Err(SyntaxError {
                offset: base + stray,
                message: "`}}` without an opening `{{`".to_owned(),
            });
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        Ok(Template { pieces })
    }

    /// The parsed pieces, in order.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// Every param path the template reads.
    pub fn params(&self) -> impl Iterator<Item = &[String]> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Param(path) => Some(path.as_slice()),
            Piece::Text(_) => None,
        })
    }

    /// The param path when the template is exactly one placeholder and nothing
    /// else, which keeps the param's JSON type in a body.
    pub fn whole_param(&self) -> Option<&[String]> {
        match self.pieces.as_slice() {
            [Piece::Param(path)] => Some(path),
            _ => None,
        }
    }

    /// True when the template has no placeholder.
    pub fn is_literal(&self) -> bool {
        self.params().next().is_none()
    }
}

fn parse_param_path(inner: &str) -> Option<Vec<String>> {
    let rest = inner.strip_prefix("params.")?;
    let path: Vec<String> = rest.split('.').map(str::to_owned).collect();
    let ident = |s: &String| {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    path.iter().all(ident).then_some(path)
}

/// A part of a string with environment references.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EnvPiece {
    /// Literal text.
    Text(String),
    /// `${env:NAME}` or `${env:NAME:-default}`.
    Var {
        /// The variable's name.
        name: String,
        /// The value used when the variable is unset or empty.
        default: Option<String>,
    },
}

/// A string with `${env:…}` references.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EnvString {
    pieces: Vec<EnvPiece>,
}

/// An environment variable a policy needs but the environment lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable `{0}` is not set and has no default")]
pub struct UnsetVariable(pub String);

impl EnvString {
    /// Parses `text`. `${` must open a complete `${env:NAME}` or
    /// `${env:NAME:-default}`; `$${` writes a literal `${`.
    pub fn parse(text: &str) -> Result<EnvString, SyntaxError> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut i = 0;
        let bytes = text.as_bytes();
        while i < text.len() {
            if text[i..].starts_with("$${") {
                literal.push_str("${");
                i += 3;
                continue;
            }
            if !text[i..].starts_with("${") {
                let c = text[i..].chars().next().unwrap_or_default();
                literal.push(c);
                i += c.len_utf8().max(1);
                continue;
            }
            let start = i;
            let close = text[i..].find('}').ok_or_else(|| SyntaxError {
                offset: start,
                message: "unclosed `${`: environment references read `${env:NAME}`".to_owned(),
            })?;
            let inner = &text[i + 2..i + close];
            let body = inner.strip_prefix("env:").ok_or_else(|| SyntaxError {
                offset: start,
                message: format!(
                    "`${{{inner}}}` is not an environment reference; write `${{env:NAME}}` (or `$${{` for a literal `${{`)"
                ),
            })?;
            let (name, default) = match body.split_once(":-") {
                Some((n, d)) => (n, Some(d.to_owned())),
                None => (body, None),
            };
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(SyntaxError {
                    offset: start,
                    message: format!(
                        "`{name}` is not a valid environment variable name (letters, digits and `_`)"
                    ),
                });
            }
            if !literal.is_empty() {
                pieces.push(EnvPiece::Text(std::mem::take(&mut literal)));
            }
            pieces.push(EnvPiece::Var {
                name: name.to_owned(),
                default,
            });
            i += close + 1;
            debug_assert!(i <= bytes.len());
        }
        if !literal.is_empty() {
            pieces.push(EnvPiece::Text(literal));
        }
        Ok(EnvString { pieces })
    }

    /// True when the string holds at least one reference.
    pub fn has_references(&self) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, EnvPiece::Var { .. }))
    }

    /// The variables referenced without a default.
    pub fn required_vars(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            EnvPiece::Var {
                name,
                default: None,
            } => Some(name.as_str()),
            _ => None,
        })
    }

    /// Fills every reference through `lookup`; an empty value counts as unset.
    pub fn expand(&self, lookup: impl Fn(&str) -> Option<String>) -> Result<String, UnsetVariable> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                EnvPiece::Text(t) => out.push_str(t),
                EnvPiece::Var { name, default } => {
                    match (lookup(name).filter(|v| !v.is_empty()), default) {
                        (Some(v), _) => out.push_str(&v),
                        (None, Some(d)) => out.push_str(d),
                        (None, None) => return Err(UnsetVariable(name.clone())),
                    }
                }
            }
        }
        Ok(out)
    }
}

impl fmt::Display for EnvString {
    /// The source form, with references left unexpanded (safe to log).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for piece in &self.pieces {
            match piece {
                EnvPiece::Text(t) => f.write_str(&t.replace("${", "$${"))?,
                EnvPiece::Var {
                    name,
                    default: None,
                } => write!(f, "${{env:{name}}}")?,
                EnvPiece::Var {
                    name,
                    default: Some(d),
                } => write!(f, "${{env:{name}:-{d}}}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_find_params_and_whole_params() {
        let t = Template::parse("/v1/tables/{{ params.table_id }}/rows").expect("parses");
        assert_eq!(
            t.params().collect::<Vec<_>>(),
            vec![["table_id".to_owned()]]
        );
        assert!(t.whole_param().is_none());
        let whole = Template::parse("{{params.row}}").expect("parses");
        assert_eq!(whole.whole_param(), Some(&["row".to_owned()][..]));
        let nested = Template::parse("{{ params.row.email }}").expect("parses");
        assert_eq!(nested.whole_param().map(<[String]>::len), Some(2));
        assert!(Template::parse("plain").expect("parses").is_literal());
    }

    #[test]
    fn malformed_templates_are_refused() {
        for bad in [
            "{{ params.x",
            "{{ email }}",
            "{{ params. }}",
            "{{ params.a b }}",
            "x }}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn env_references_expand_with_defaults() {
        let s = EnvString::parse("Bearer ${env:KEY}").expect("parses");
        assert_eq!(s.required_vars().collect::<Vec<_>>(), ["KEY"]);
        assert_eq!(
            s.expand(|_| Some("s3cret".into())),
            Ok("Bearer s3cret".into())
        );
        assert_eq!(s.expand(|_| None), Err(UnsetVariable("KEY".into())));
        let d = EnvString::parse("${env:URL:-https://api.clay.com}/v1").expect("parses");
        assert_eq!(d.expand(|_| None), Ok("https://api.clay.com/v1".into()));
        assert_eq!(d.required_vars().count(), 0);
        let empty_default = EnvString::parse("${env:HOOK:-}").expect("parses");
        assert_eq!(empty_default.expand(|_| None), Ok(String::new()));
        let literal = EnvString::parse("cost: $${x} ü").expect("parses");
        assert_eq!(literal.expand(|_| None), Ok("cost: ${x} ü".into()));
        assert!(!literal.has_references());
    }

    #[test]
    fn malformed_env_references_are_refused() {
        for bad in ["${env:KEY", "${KEY}", "${env:}", "${env:1X}", "${env:A-B}"] {
            assert!(EnvString::parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
