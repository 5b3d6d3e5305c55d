//! The decoder against events captured from the real Debezium connector
//! (tests/fixtures, made by scripts/capture-fixtures): every op of every
//! table, tombstones and a truncate, in three encodings.

mod common;

use std::collections::BTreeMap;

use etl::cdc::{self, Decoded, Table, TableChange};

/// Decodes every record of a capture, in order.
fn decode_capture(name: &str) -> Vec<Decoded> {
    let text = std::fs::read_to_string(common::fixture(name)).unwrap();
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            let topic = record["topic"].as_str().unwrap();
            let table = Table::from_topic(topic, "online_store")
                .unwrap_or_else(|| panic!("line {}: topic {topic}", i + 1));
            let value = match &record["value"] {
                serde_json::Value::Null => None,
                v => Some(serde_json::to_vec(v).unwrap()),
            };
            cdc::decode(table, value.as_deref())
                .unwrap_or_else(|e| panic!("{name} line {}: {e}", i + 1))
        })
        .collect()
}

fn census(decoded: &[Decoded]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for d in decoded {
        let label = match d {
            Decoded::Change(c) => {
                let (table, op) = match c {
                    TableChange::Customer(c) => ("customers", c.op),
                    TableChange::Product(c) => ("products", c.op),
                    TableChange::Order(c) => ("orders", c.op),
                    TableChange::OrderItem(c) => ("order_items", c.op),
                };
                format!("{table}:{}", op.as_str())
            }
            Decoded::Tombstone => "tombstone".into(),
            Decoded::Truncate => "truncate".into(),
        };
        *counts.entry(label).or_default() += 1;
    }
    counts
}

#[test]
fn every_op_of_every_table_decodes() {
    let decoded = decode_capture("schemas_off_string.jsonl");
    let counts = census(&decoded);
    for table in ["customers", "products", "orders", "order_items"] {
        for op in ["r", "c", "u", "d"] {
            assert!(
                counts.contains_key(&format!("{table}:{op}")),
                "no {table}:{op} in {counts:?}"
            );
        }
    }
    assert_eq!(
        counts["tombstone"], 7,
        "one tombstone per delete (cascade included)"
    );
    let deletes: usize = counts
        .iter()
        .filter(|(k, _)| k.ends_with(":d"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(deletes, 7);
}

#[test]
fn the_three_encodings_decode_to_the_same_changes() {
    let string = decode_capture("schemas_off_string.jsonl");
    let precise = decode_capture("schemas_on_precise.jsonl");
    let double = decode_capture("schemas_off_double.jsonl");
    assert_eq!(string.len(), 58);
    // Decimal equality is by value: "45.00", 45.0 and base64 4500/scale 2 agree.
    assert_eq!(string, precise);
    assert_eq!(string, double);
}

#[test]
fn updates_and_deletes_carry_full_before_images() {
    for d in decode_capture("schemas_on_precise.jsonl") {
        if let Decoded::Change(TableChange::Order(c)) = d {
            if let Some(before) = &c.before {
                // REPLICA IDENTITY FULL: real values, not Debezium's placeholders.
                assert!(!before.status.is_empty(), "{c:?}");
                assert!(before.created_at.timestamp() > 0, "{c:?}");
            }
        }
    }
}

#[test]
fn a_real_truncate_is_recognised() {
    assert_eq!(decode_capture("truncate.jsonl"), vec![Decoded::Truncate]);
}
