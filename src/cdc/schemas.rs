//! The row schemas of recent `{schema, payload}` messages, by the text of
//! their schema.
//!
//! With schemas on, every message of a table carries the same Connect schema
//! (some KB) until the table changes, and parsing it was most of the cost of
//! such a message. So each thread keeps the columns of the last few schema
//! texts it parsed, and the scanner recognises a known schema by comparing
//! bytes ([`Cache::find`]): a kept text is a complete JSON object that the
//! scanner checked and that parsed, and an object ends at its own closing
//! brace, so bytes that start with that text hold exactly that schema.

use std::cell::RefCell;
use std::rc::Rc;

use super::field::{row_schema, ColumnSchema};
use super::DecodeError;

/// The columns one schema describes, shared by the messages that carry it.
pub(crate) type Columns = Rc<[ColumnSchema<'static>]>;

/// Schema texts a thread keeps: each captured table's, with room for
/// tables whose schema just changed while messages with the old one are
/// still coming. Each text is no longer than a message.
pub(crate) const CAPACITY: usize = 8;

struct Entry {
    text: Box<str>,
    columns: Columns,
}

#[derive(Default)]
pub(crate) struct Cache {
    /// Most recently used first; the last is the one to drop.
    entries: Vec<Entry>,
}

impl Cache {
    /// The kept schema that `rest` starts with: its length in bytes and its
    /// columns.
    pub fn find(&mut self, rest: &[u8]) -> Option<(usize, Columns)> {
        let i = self
            .entries
            .iter()
            .position(|e| rest.starts_with(e.text.as_bytes()))?;
        self.entries[..=i].rotate_right(1);
        let entry = &self.entries[0];
        Some((entry.text.len(), entry.columns.clone()))
    }

    /// Parses a schema that [`Self::find`] did not know, and keeps it if it
    /// parses. `text` must be one whole JSON object, as the scanner checked
    /// it: `find` trusts that.
    pub fn parse(&mut self, text: &str) -> Result<Columns, DecodeError> {
        let columns: Columns = row_schema(text)?
            .into_iter()
            .map(ColumnSchema::into_owned)
            .collect();
        self.entries.truncate(CAPACITY - 1);
        self.entries.insert(
            0,
            Entry {
                text: text.into(),
                columns: columns.clone(),
            },
        );
        Ok(columns)
    }

    /// The kept texts, most recently used first.
    #[cfg(test)]
    pub fn texts(&self) -> Vec<&str> {
        self.entries.iter().map(|e| &*e.text).collect()
    }
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::default();
}

/// Runs `f` with this thread's cache.
pub(crate) fn with<R>(f: impl FnOnce(&mut Cache) -> R) -> R {
    CACHE.with(|cache| f(&mut cache.borrow_mut()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(column: &str) -> String {
        format!(r#"{{"fields":[{{"field":"after","fields":[{{"field":"{column}"}}]}}]}}"#)
    }

    #[test]
    fn finds_a_kept_text_at_the_start_of_the_bytes_only() {
        let mut cache = Cache::default();
        let text = schema("a");
        let columns = cache.parse(&text).unwrap();
        assert_eq!(&*columns[0].column, "a");
        let (len, found) = cache
            .find(format!("{text},\"payload\":null}}").as_bytes())
            .unwrap();
        assert_eq!(len, text.len());
        assert!(Rc::ptr_eq(&found, &columns));
        assert!(cache.find(format!(" {text}").as_bytes()).is_none());
        assert!(cache.find(&text.as_bytes()[..text.len() - 1]).is_none());
        assert!(cache.find(schema("b").as_bytes()).is_none());
    }

    #[test]
    fn keeps_a_bounded_number_dropping_the_least_recently_used() {
        let mut cache = Cache::default();
        let texts: Vec<String> = (0..CAPACITY + 3).map(|i| schema(&i.to_string())).collect();
        cache.parse(&texts[0]).unwrap();
        for text in &texts[1..] {
            // The first stays in use, so it stays.
            assert!(cache.find(texts[0].as_bytes()).is_some());
            cache.parse(text).unwrap();
            assert!(cache.texts().len() <= CAPACITY);
        }
        let kept = cache.texts();
        assert_eq!(kept.len(), CAPACITY);
        assert_eq!(kept[0], texts[CAPACITY + 2]);
        assert!(kept.contains(&texts[0].as_str()));
        assert!(!kept.contains(&texts[1].as_str()));
    }

    #[test]
    fn a_schema_that_does_not_parse_is_not_kept() {
        let mut cache = Cache::default();
        let bad =
            r#"{"fields":[{"field":"after","fields":[{"field":"p","parameters":{"scale":"x"}}]}]}"#;
        assert!(cache.parse(bad).is_err());
        assert!(cache.parse(r#"{"fields":7}"#).is_err());
        assert!(cache.texts().is_empty());
    }
}
