//! Finds where a field sits in a scene's TOML text, so that validation errors (found after
//! deserialising, when serde's spans are gone) can still name a line.

use std::ops::Range;

use toml_edit::{ImDocument, Item, Table, Value};

/// A step in a field path: a key or an index into an array (of tables or of values).
#[derive(Debug, Clone, PartialEq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

pub fn key(k: &str) -> Seg {
    Seg::Key(k.to_string())
}

pub fn path_to_string(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// Converts a byte offset into a 1-based (line, column).
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}

/// The byte span of the deepest part of `path` present in the document: the value itself when
/// it is there, else the nearest table or key that holds it.
pub fn span_of(text: &str, path: &[Seg]) -> Option<Range<usize>> {
    let doc = ImDocument::parse(text).ok()?;
    in_table(doc.as_table(), path, None)
}

fn in_table(table: &Table, path: &[Seg], best: Option<Range<usize>>) -> Option<Range<usize>> {
    let best = table.span().or(best);
    let Some((Seg::Key(k), rest)) = path.split_first() else {
        return best;
    };
    match table.get_key_value(k) {
        Some((key, item)) => in_item(item, rest, key.span().or(best)),
        None => best,
    }
}

fn in_item(item: &Item, path: &[Seg], best: Option<Range<usize>>) -> Option<Range<usize>> {
    match item {
        Item::Table(t) => in_table(t, path, best),
        Item::ArrayOfTables(array) => match path.split_first() {
            Some((Seg::Index(i), rest)) => match array.get(*i) {
                Some(t) => in_table(t, rest, best),
                None => best,
            },
            _ => array.span().or(best),
        },
        Item::Value(v) => in_value(v, path, best),
        Item::None => best,
    }
}

fn in_value(value: &Value, path: &[Seg], best: Option<Range<usize>>) -> Option<Range<usize>> {
    let here = value.span().or(best);
    match (value, path.split_first()) {
        (_, None) => here,
        (Value::Array(a), Some((Seg::Index(i), rest))) => match a.get(*i) {
            Some(v) => in_value(v, rest, here),
            None => here,
        },
        (Value::InlineTable(t), Some((Seg::Key(k), rest))) => match t.get(k) {
            Some(v) => in_value(v, rest, here),
            None => here,
        },
        _ => here,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[scene]\nname = \"x\"\n\n[[instrument]]\nname = \"a\"\n\n[[instrument]]\nname = \"b\"\npolyphony = 900\nvoices = [\"soprano\", \"flute\"]\n";

    fn line(path: &[Seg]) -> usize {
        line_col(TEXT, span_of(TEXT, path).unwrap().start).0
    }

    #[test]
    fn finds_values_in_arrays_of_tables() {
        assert_eq!(
            line(&[key("instrument"), Seg::Index(1), key("polyphony")]),
            9
        );
        assert_eq!(
            line(&[
                key("instrument"),
                Seg::Index(1),
                key("voices"),
                Seg::Index(1)
            ]),
            10
        );
        assert_eq!(line(&[key("scene"), key("name")]), 2);
    }

    #[test]
    fn absent_fields_point_at_their_table() {
        assert_eq!(line(&[key("instrument"), Seg::Index(0), key("kind")]), 4);
        assert_eq!(
            path_to_string(&[key("instrument"), Seg::Index(0), key("kind")]),
            "instrument[0].kind"
        );
    }
}
