//! The hand-written Varlink interface text against the method table and [`ApiError`]: the same
//! methods in the same order, the same parameter and reply fields, the same errors with the
//! same parameters. Reads the text and the types only; changes nothing.

use std::collections::BTreeSet;

use serde::de::{self, Deserialize, Visitor};

use super::{ApiError, INTERFACE, INTERFACE_DESCRIPTION};

/// One `method` or `error` of the interface text.
#[derive(Debug)]
struct Declared {
    name: String,
    /// `(name, type)` of each parameter.
    params: Vec<(String, String)>,
    /// Field names of the reply (methods only).
    reply: Vec<String>,
}

/// The text from `open` (just past a `(`) to its matching `)`, and the rest after it.
fn group(open: &str) -> (&str, &str) {
    let mut depth = 1;
    for (i, c) in open.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return (&open[..i], &open[i + 1..]);
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses in the interface text: {open}");
}

fn fields(list: &str) -> Vec<(String, String)> {
    list.split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(|f| {
            let (name, ty) = f.split_once(':').expect("a field is `name: type`");
            (name.trim().to_owned(), ty.trim().to_owned())
        })
        .collect()
}

/// Every `keyword Name(...)` of the text, comments dropped.
fn declared(keyword: &str) -> Vec<Declared> {
    let text: String = INTERFACE_DESCRIPTION
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let marker = format!("\n{keyword} ");
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find(&marker) {
        let after = &rest[at + marker.len()..];
        let (name, after) = after.split_once('(').expect("a name then `(`");
        let (params, after) = group(after);
        let mut reply = Vec::new();
        let mut next = after;
        if keyword == "method" {
            let (_, r) = after.split_once("->").expect("a method has `->`");
            let (_, r) = r.split_once('(').expect("a reply is `(...)`");
            let (list, r) = group(r);
            reply = fields(list).into_iter().map(|(n, _)| n).collect();
            next = r;
        }
        out.push(Declared {
            name: name.trim().to_owned(),
            params: fields(params),
            reply,
        });
        rest = next;
    }
    out
}

/// A deserializer that only records the field names a struct asks for.
struct FieldNames(&'static [&'static str]);

#[derive(Debug)]
struct Stop;

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stop")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Stop
    }
}

struct Recorder<'a>(&'a mut FieldNames);

impl<'de> de::Deserializer<'de> for Recorder<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Stop> {
        self.0 .0 = fields;
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// The serialized field names of a struct type.
fn struct_fields<'de, T: Deserialize<'de>>() -> BTreeSet<String> {
    let mut names = FieldNames(&[]);
    let _ = T::deserialize(Recorder(&mut names));
    names.0.iter().map(|&f| f.to_owned()).collect()
}

/// Name, parameter fields and reply fields of every row of the table.
fn table() -> Vec<(&'static str, BTreeSet<String>, BTreeSet<String>)> {
    macro_rules! rows {
        ($(
            $(#[$doc:meta])*
            $name:ident($params:ty) -> $reply:ty { $($rest:tt)* }
        )*) => {
            vec![$((
                stringify!($name),
                struct_fields::<$params>(),
                struct_fields::<$reply>(),
            )),*]
        };
    }
    crate::keyward_methods!(rows)
}

#[test]
fn the_interface_text_declares_exactly_the_tables_methods() {
    let text = declared("method");
    let names: Vec<&str> = text.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        super::METHODS,
        "methods of the interface text vs the table"
    );
    for (name, params, reply) in table() {
        let m = text.iter().find(|m| m.name == name).expect("listed");
        let text_params: BTreeSet<String> = m.params.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(text_params, params, "parameters of {name}");
        let text_reply: BTreeSet<String> = m.reply.iter().cloned().collect();
        assert_eq!(text_reply, reply, "reply of {name}");
    }
}

/// A value of a Varlink type, as the text spells it, for the error test.
fn sample(ty: &str) -> serde_json::Value {
    match ty.trim_start_matches('?') {
        "string" => "x".into(),
        "int" => 7.into(),
        "bool" => true.into(),
        other => panic!("no sample for error parameter type {other}"),
    }
}

#[test]
fn the_interface_text_declares_exactly_the_errors() {
    let text = declared("error");
    // Every error the text declares is one of ours, with exactly its parameters.
    for e in &text {
        let params: serde_json::Map<_, _> = e
            .params
            .iter()
            .map(|(n, ty)| (n.clone(), sample(ty)))
            .collect();
        let name = format!("{INTERFACE}.{}", e.name);
        let known = ApiError::from_wire(&name, &serde_json::Value::Object(params.clone()));
        assert!(
            !matches!(known, ApiError::Other { .. }),
            "{name} is not an ApiError"
        );
        assert_eq!(
            known.parameters(),
            serde_json::Value::Object(params),
            "{name}"
        );
    }
    // And every error of ours (serde lists the variants it knows) is in the text.
    let unknown = serde_json::from_str::<ApiError>(r#"{"error":"NoSuchError"}"#)
        .expect_err("not a variant")
        .to_string();
    let expected = unknown
        .split("expected one of")
        .nth(1)
        .expect("serde lists the variants");
    let ours: BTreeSet<&str> = expected
        .split(',')
        .map(|v| v.trim().trim_matches('`'))
        .filter(|v| !v.contains('.') && !v.is_empty())
        .map(|v| v.split('`').next().unwrap_or(v))
        .collect();
    let in_text: BTreeSet<&str> = text.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(ours, in_text, "errors of ApiError vs the interface text");
}
