//! Reading policy files: YAML text to a JSON value plus the source span of every node.
//!
//! YAML is parsed by serde-saphyr (the maintained serde successor to the
//! deprecated serde_yaml) into a tree where each node carries its
//! position, then flattened into a `serde_json::Value` (what the JSON Schema
//! and the typed model read) and a [`SpanIndex`] from JSON pointer to source
//! position, so any later check can point at the exact line and column.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use serde_saphyr::{Location, Spanned};

use super::diagnostic::{Code, Diagnostic, Span};

/// Largest policy file accepted; bigger files are refused before parsing.
pub const MAX_FILE_BYTES: usize = 4 * 1024 * 1024;

/// Where a node and, for mapping values, its key stand in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSpans {
    /// The key of a mapping entry; `None` for the root and sequence items.
    pub key: Option<Span>,
    /// The value itself.
    pub value: Span,
}

/// Source positions of a document's nodes, by JSON pointer (RFC 6901).
///
/// Hashed with foldhash (randomly seeded per process), not SipHash: every
/// node of every file goes in, and SipHash took a third of building it.
#[derive(Debug, Clone, Default)]
pub struct SpanIndex {
    nodes: foldhash::HashMap<String, NodeSpans>,
}

impl SpanIndex {
    /// Spans of the node at `pointer`.
    pub fn get(&self, pointer: &str) -> Option<NodeSpans> {
        self.nodes.get(pointer).copied()
    }

    /// Best place to point at for a problem with the value at `pointer`: the
    /// value for scalars, the key for mappings and sequences (whose own span
    /// is only where they begin); the nearest ancestor when the node is absent.
    pub fn value_span(&self, pointer: &str) -> Option<Span> {
        let mut p = pointer;
        loop {
            if let Some(n) = self.nodes.get(p) {
                return Some(match n.key {
                    Some(k) if n.value.len == 0 => k,
                    _ => n.value,
                });
            }
            p = parent_pointer(p)?;
        }
    }

    /// The key of the entry at `pointer`, else its value, else the nearest ancestor's.
    pub fn key_span(&self, pointer: &str) -> Option<Span> {
        match self.nodes.get(pointer) {
            Some(NodeSpans { key: Some(k), .. }) => Some(*k),
            _ => self.value_span(pointer),
        }
    }
}

/// The pointer of the parent node, `None` at the root.
pub fn parent_pointer(pointer: &str) -> Option<&str> {
    if pointer.is_empty() {
        None
    } else {
        pointer.rfind('/').map(|i| &pointer[..i])
    }
}

/// A JSON pointer with one escaped segment appended.
pub fn push_segment(pointer: &str, segment: &str) -> String {
    let mut out = String::with_capacity(pointer.len() + segment.len() + 1);
    out.push_str(pointer);
    append_segment(&mut out, segment);
    out
}

/// Appends one escaped segment to a JSON pointer in place.
pub fn append_segment(pointer: &mut String, segment: &str) {
    pointer.push('/');
    if !segment.contains(['~', '/']) {
        pointer.push_str(segment);
        return;
    }
    for c in segment.chars() {
        match c {
            '~' => pointer.push_str("~0"),
            '/' => pointer.push_str("~1"),
            c => pointer.push(c),
        }
    }
}

/// A YAML document read into JSON, with positions.
#[derive(Debug, Clone)]
pub struct Document {
    /// The document as JSON.
    pub value: Value,
    /// Positions of its nodes.
    pub spans: SpanIndex,
}

/// Parses one YAML document. Problems come back as diagnostics against `file`;
/// an empty document (nothing but comments) is `Ok(None)`.
pub fn parse_yaml(file: &str, text: &str) -> Result<Option<Document>, Vec<Diagnostic>> {
    if text.len() > MAX_FILE_BYTES {
        return Err(vec![
            Diagnostic::error(
                Code::FileTooLarge,
                file,
                None,
                format!(
                    "file is {} bytes; policy files may be at most {MAX_FILE_BYTES} bytes",
                    text.len()
                ),
            )
            .hint("split the policies over several files"),
        ]);
    }
    let options = serde_saphyr::options! {
        with_snippet: false,
        strict_booleans: true,
    };
    let root: Spanned<Node> = match serde_saphyr::from_str_with_options(text, options) {
        Ok(root) => root,
        Err(e) => return Err(vec![yaml_error(file, text, &e)]),
    };
    if matches!(root.value, Node::Null) && is_blank(text) {
        return Ok(None);
    }
    let mut spans = SpanIndex::default();
    let mut problems = Vec::new();
    let value = flatten(
        file,
        text,
        root,
        None,
        String::new(),
        &mut spans,
        &mut problems,
    );
    if problems.is_empty() {
        Ok(Some(Document { value, spans }))
    } else {
        Err(problems)
    }
}

/// True when the text holds no YAML content: only whitespace, comments and markers.
fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "---" || t == "..."
    })
}

fn yaml_error(file: &str, text: &str, e: &serde_saphyr::Error) -> Diagnostic {
    use serde_saphyr::Error as E;
    let mut inner = e;
    while let E::AliasError { error, .. } | E::WithSnippet { error, .. } = inner {
        inner = error;
    }
    let mut span = e.location().and_then(|l| span_of(text, l));
    let (code, message, hint) = match inner {
        E::DuplicateMappingKey { .. } => (
            Code::DuplicateKey,
            clean_yaml_message(&inner.to_string()),
            Some("remove one of the two entries; YAML would keep only one of them silently"),
        ),
        E::MultipleDocuments { .. } => (
            Code::MultipleDocuments,
            "a second YAML document in one file".to_owned(),
            Some("put each document in a file of its own: one file is one YAML document"),
        ),
        E::NonFiniteFloat { value, .. } => (
            Code::UnrepresentableValue,
            format!("`{value}` is not a finite number and cannot be used in a policy"),
            Some("write a finite number"),
        ),
        E::Budget { .. }
        | E::AliasReplayLimitExceeded { .. }
        | E::AliasExpansionLimitExceeded { .. }
        | E::AliasReplayStackDepthExceeded { .. }
        | E::AliasReplayCounterOverflow { .. } => (
            Code::YamlLimit,
            "the document expands past the loader's limits on nodes, aliases or nesting".to_owned(),
            Some("an alias bomb looks like this; write the values out, or split the file"),
        ),
        _ => {
            let message = clean_yaml_message(&inner.to_string());
            // The parser marks the scalar before a stray tab; point at the tab.
            if message.contains("found a tab")
                && let Some(s) = span
                && let Some(rel) = text.get(s.offset..).and_then(|t| t.find('\t'))
            {
                span = point_at(text, s.offset + rel);
            }
            let hint = message
                .contains("tab")
                .then_some("YAML indents with spaces only");
            (Code::YamlSyntax, message, hint)
        }
    };
    let d = Diagnostic::error(code, file, span, message);
    match hint {
        Some(h) => d.hint(h),
        None => d,
    }
}

/// The span of the single character at byte `offset`.
pub(crate) fn point_at(text: &str, offset: usize) -> Option<Span> {
    let before = text.get(..offset)?;
    let rest = text.get(offset..).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    Some(Span {
        line: u32::try_from(line).ok()?,
        column: u32::try_from(column).ok()?,
        offset,
        len: rest.chars().next().map_or(0, char::len_utf8),
    })
}

/// Strips the parser's own "error: line N column M:" prefix, a trailing
/// "at line N, column M" and advice aimed at programmers, keeping the
/// sentence users need.
fn clean_yaml_message(raw: &str) -> String {
    let mut m = raw.trim();
    m = m.strip_prefix("error:").unwrap_or(m).trim_start();
    if let Some(rest) = m.strip_prefix("line ")
        && let Some(i) = rest.find(": ")
    {
        let head = &rest[..i];
        if head.chars().all(|c| c.is_ascii_alphanumeric() || c == ' ') {
            m = &rest[i + 2..];
        }
    }
    for cut in [", set DuplicateKeyPolicy", "; use from_str_multiple"] {
        if let Some(i) = m.find(cut) {
            m = &m[..i];
        }
    }
    if let Some(i) = m.rfind(" at line ") {
        let tail = &m[i + " at line ".len()..];
        if tail
            .chars()
            .all(|c| c.is_ascii_digit() || c == ',' || c == ' ' || c.is_ascii_alphabetic())
            && tail.contains("column")
        {
            m = &m[..i];
        }
    }
    let mut s = m.trim().to_owned();
    if let Some(first) = s.get(..1) {
        let lower = first.to_lowercase();
        s.replace_range(..1, &lower);
    }
    s
}

/// Converts a parser location to our span, finding the byte offset from the
/// line and column when the parser has none.
fn span_of(text: &str, loc: Location) -> Option<Span> {
    let line = u32::try_from(loc.line()).ok().filter(|l| *l > 0)?;
    let column = u32::try_from(loc.column()).ok().filter(|c| *c > 0)?;
    let s = loc.span();
    let offset = s
        .byte_offset()
        .and_then(|o| usize::try_from(o).ok())
        .filter(|o| *o <= text.len())
        .unwrap_or_else(|| offset_of(text, line, column));
    let len = s
        .byte_len()
        .and_then(|l| usize::try_from(l).ok())
        .unwrap_or(0)
        .min(text.len() - offset);
    Some(Span {
        line,
        column,
        offset,
        len,
    })
}

/// Byte offset of a 1-based line and character column; clamped to the text.
fn offset_of(text: &str, line: u32, column: u32) -> usize {
    let mut start = 0;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if i + 1 == line as usize {
            let col = (column as usize).saturating_sub(1);
            return start + l.char_indices().nth(col).map_or(l.len(), |(byte, _)| byte);
        }
        start += l.len();
    }
    text.len()
}

fn flatten(
    file: &str,
    text: &str,
    node: Spanned<Node>,
    key: Option<Span>,
    pointer: String,
    spans: &mut SpanIndex,
    problems: &mut Vec<Diagnostic>,
) -> Value {
    let here = span_of(text, node.referenced).unwrap_or(Span {
        line: 1,
        column: 1,
        offset: 0,
        len: 0,
    });
    let value = match node.value {
        Node::Null => Value::Null,
        Node::Bool(b) => Value::Bool(b),
        Node::Int(i) => Value::from(i),
        Node::UInt(u) => Value::from(u),
        // JSON Schema counts 2.0 as an integer; so do we, so `max_attempts: 2.0`
        // means 2 rather than failing later in the typed model.
        Node::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
        Node::Float(f) => match serde_json::Number::from_f64(f) {
            Some(n) => Value::Number(n),
            None => {
                problems.push(
                    Diagnostic::error(
                        Code::UnrepresentableValue,
                        file,
                        Some(here),
                        format!("{f} cannot be used in a policy"),
                    )
                    .at(&pointer),
                );
                Value::Null
            }
        },
        Node::Str(s) => Value::String(s),
        Node::Seq(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    let p = push_segment(&pointer, &i.to_string());
                    flatten(file, text, item, None, p, spans, problems)
                })
                .collect(),
        ),
        Node::Map(entries) => {
            let mut map = Map::new();
            for (k, v) in entries {
                let key_span = span_of(text, k.referenced);
                let name = match k.value {
                    Node::Str(s) => s,
                    other => {
                        problems.push(
                            Diagnostic::error(
                                Code::NonStringKey,
                                file,
                                key_span,
                                format!("mapping key {} is not a string", other.describe()),
                            )
                            .at(&pointer)
                            .hint("quote the key"),
                        );
                        continue;
                    }
                };
                // A merge (`<<`) appends inherited keys after the explicit ones;
                // the explicit key wins, as YAML's merge rules say.
                if map.contains_key(&name) {
                    continue;
                }
                let p = push_segment(&pointer, &name);
                let value = flatten(file, text, v, key_span, p, spans, problems);
                map.insert(name, value);
            }
            Value::Object(map)
        }
    };
    spans.nodes.insert(pointer, NodeSpans { key, value: here });
    value
}

/// A YAML node as serde-saphyr hands it over, each child with its position.
enum Node {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<Node>, Spanned<Node>)>),
}

impl Node {
    fn describe(&self) -> String {
        match self {
            Node::Null => "null".into(),
            Node::Bool(b) => format!("`{b}`"),
            Node::Int(i) => format!("`{i}`"),
            Node::UInt(u) => format!("`{u}`"),
            Node::Float(f) => format!("`{f}`"),
            Node::Str(s) => format!("{s:?}"),
            Node::Seq(_) => "a sequence".into(),
            Node::Map(_) => "a mapping".into(),
        }
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML node")
    }

    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::UInt(v))
    }

    fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<Node, E> {
        Err(E::custom(format!("integer {v} is too large")))
    }

    fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Node, E> {
        Err(E::custom(format!("integer {v} is too large")))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }

    fn visit_bytes<E>(self, v: &[u8]) -> Result<Node, E> {
        Ok(Node::Str(String::from_utf8_lossy(v).into_owned()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key()? {
            let value = map.next_value()?;
            entries.push((key, value));
        }
        Ok(Node::Map(entries))
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Document {
        match parse_yaml("t.yaml", text) {
            Ok(Some(doc)) => doc,
            other => panic!("expected a document, got {other:?}"),
        }
    }

    fn parse_err(text: &str) -> Diagnostic {
        match parse_yaml("t.yaml", text) {
            Err(mut d) => d.remove(0),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn every_node_keeps_its_position() {
        let doc = parse("version: 1\nops:\n  a:\n    t: 30s\n    l: [1, x]\n");
        let t = doc.spans.get("/ops/a/t").expect("t indexed");
        assert_eq!((t.value.line, t.value.column), (4, 8));
        assert_eq!(t.key.map(|k| (k.line, k.column)), Some((4, 5)));
        let x = doc.spans.get("/ops/a/l/1").expect("item indexed");
        assert_eq!((x.value.line, x.value.column), (5, 12));
        assert_eq!(doc.value["ops"]["a"]["l"][1], "x");
    }

    #[test]
    fn anchors_and_merges_resolve_and_explicit_keys_win() {
        let doc = parse("base: &b {x: 1, y: 2}\nop:\n  <<: *b\n  y: 3\n");
        assert_eq!(doc.value["op"], serde_json::json!({"x": 1, "y": 3}));
    }

    #[test]
    fn yaml_1_1_booleans_stay_strings() {
        let doc = parse("a: no\nb: yes\nc: true\n");
        assert_eq!(
            doc.value,
            serde_json::json!({"a": "no", "b": "yes", "c": true})
        );
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let d = parse_err("a: [1, 2\nb: 3\n");
        assert_eq!(d.code, Code::YamlSyntax);
        assert_eq!(d.span.map(|s| s.line), Some(2));
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let d = parse_err("a: 1\nb:\n  c: 2\n  c: 3\n");
        assert_eq!(d.code, Code::DuplicateKey);
        assert_eq!(d.span.map(|s| (s.line, s.column)), Some((4, 3)));
        assert!(d.message.contains("duplicate"), "{}", d.message);
        assert!(!d.message.contains("DuplicateKeyPolicy"), "{}", d.message);
    }

    #[test]
    fn an_alias_bomb_is_refused_quickly() {
        let mut text = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        let mut prev = 'a';
        for name in "bcdefghi".chars() {
            let refs = vec![format!("*{prev}"); 9].join(",");
            text.push_str(&format!("{name}: &{name} [{refs}]\n"));
            prev = name;
        }
        assert_eq!(parse_err(&text).code, Code::YamlLimit);
    }

    #[test]
    fn empty_and_comment_only_files_are_empty() {
        assert!(matches!(parse_yaml("t.yaml", ""), Ok(None)));
        assert!(matches!(parse_yaml("t.yaml", "# nothing\n---\n"), Ok(None)));
    }

    #[test]
    fn non_string_keys_are_named() {
        let d = parse_err("1: x\n");
        assert_eq!(d.code, Code::NonStringKey);
    }

    #[test]
    fn multiple_documents_are_refused() {
        assert_eq!(parse_err("a: 1\n---\nb: 2\n").code, Code::MultipleDocuments);
    }
}
