//! The decoder against events captured from the real Debezium connector
//! (tests/fixtures, made by scripts/capture-fixtures): every op of every
//! table, tombstones and a truncate, in three encodings; and the same with
//! the tables in REPLICA IDENTITY DEFAULT (replica_identity_default.sql).

use std::collections::BTreeMap;

use etl::aggregate::{AggregateState, Products};
use etl::cdc::{
    self, Change, DecodeError, DecodeErrorKind, Decoded, Op, Origin, Position, Product, ProductKey,
    Table, TableChange,
};
use rust_decimal::Decimal;

/// Decodes every record of a capture's table topics, in order: (table,
/// result). Other topics (the transaction topic) are left out.
fn decode_all(name: &str) -> Vec<(Table, Result<Decoded, DecodeError>)> {
    let text = std::fs::read_to_string(etl_testkit::fixture(name)).unwrap();
    text.lines()
        .filter_map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            let topic = record["topic"].as_str().unwrap();
            let table = Table::from_topic(topic, "online_store")?;
            let value = match &record["value"] {
                serde_json::Value::Null => None,
                v => Some(serde_json::to_vec(v).unwrap()),
            };
            Some((table, cdc::decode(table, value.as_deref())))
        })
        .collect()
}

/// Decodes every record of a capture, in order; each must decode.
fn decode_capture(name: &str) -> Vec<Decoded> {
    decode_all(name)
        .into_iter()
        .enumerate()
        .map(|(i, (_, decoded))| decoded.unwrap_or_else(|e| panic!("{name} line {}: {e}", i + 1)))
        .collect()
}

fn census(decoded: &[Decoded]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for d in decoded {
        let label = match d {
            Decoded::Change(c, _) => {
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

/// The change alone: captures made in separate runs have other positions.
fn without_origin(decoded: Decoded) -> Decoded {
    match decoded {
        Decoded::Change(change, _) => Decoded::Change(change, Origin::Stream(Position::default())),
        other => other,
    }
}

#[test]
fn the_three_encodings_decode_to_the_same_changes() {
    let changes = |name| -> Vec<Decoded> {
        decode_capture(name)
            .into_iter()
            .map(without_origin)
            .collect()
    };
    let string = changes("schemas_off_string.jsonl");
    let precise = changes("schemas_on_precise.jsonl");
    let double = changes("schemas_off_double.jsonl");
    assert_eq!(string.len(), 58);
    // Decimal equality is by value: "45.00", 45.0 and base64 4500/scale 2 agree.
    assert_eq!(string, precise);
    assert_eq!(string, double);
}

#[test]
fn updates_and_deletes_carry_full_before_images() {
    for d in decode_capture("schemas_on_precise.jsonl") {
        if let Decoded::Change(TableChange::Order(c), _) = d {
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

const DEFAULT_CAPTURES: [&str; 3] = [
    "replica_identity_default_schemas_off_string.jsonl",
    "replica_identity_default_schemas_off_double.jsonl",
    "replica_identity_default_schemas_on_precise.jsonl",
];

#[test]
fn replica_identity_default_captures_decode_alike_in_the_three_encodings() {
    let [string, double, precise] = DEFAULT_CAPTURES.map(|name| {
        decode_all(name)
            .into_iter()
            .map(|(table, decoded)| (table, decoded.map(without_origin)))
            .collect::<Vec<_>>()
    });
    assert_eq!(string.len(), 40);
    // Errors included: the same reason and words whatever the encoding.
    assert_eq!(string, double);
    assert_eq!(string, precise);
}

/// With REPLICA IDENTITY DEFAULT, the real connector sends an update without
/// a before image and a delete with the key and placeholders. Exactly the
/// updates and deletes of the tables whose aggregates subtract fail, as
/// missing_before naming the table and the fix; a key-only delete is never
/// taken for a row (it would subtract a 1970 order of status "pending").
#[test]
fn with_replica_identity_default_only_tables_whose_aggregates_subtract_miss_the_old_row() {
    let fix = |table: &str| {
        format!(
            "the aggregates of {table} subtract the old row, which Debezium sends only for a \
             table with REPLICA IDENTITY FULL: run ALTER TABLE {table} REPLICA IDENTITY FULL"
        )
    };
    let none = |table: &str, op: &str| format!("{table} op {op}: no before image; {}", fix(table));
    let key_only = |table: &str| {
        format!(
            "{table} op d: the before image holds only the key (placeholders in the other \
             columns: the table has REPLICA IDENTITY DEFAULT); {}",
            fix(table)
        )
    };
    let expected: Vec<(usize, String)> = vec![
        (14, none("customers", "u")),
        (15, key_only("customers")),
        // The delete half of a primary-key change (102 -> 104).
        (18, key_only("customers")),
        (31, none("orders", "u")),
        (32, none("order_items", "u")),
        (33, none("orders", "u")),
        (34, key_only("order_items")),
        (36, none("orders", "u")),
        (37, key_only("orders")),
        // Deleted by ON DELETE CASCADE.
        (39, key_only("order_items")),
    ];
    for name in DEFAULT_CAPTURES {
        let mut failed = Vec::new();
        for (i, (table, decoded)) in decode_all(name).into_iter().enumerate() {
            if let Err(e) = decoded {
                assert_eq!(
                    e.kind,
                    DecodeErrorKind::MissingBefore,
                    "{name} line {}",
                    i + 1
                );
                assert!(table.needs_whole_old_row(), "{name} line {}", i + 1);
                failed.push((i + 1, e.detail));
            }
        }
        assert_eq!(failed, expected, "{name}");
    }
}

fn product(id: i64, name: &str, category: &str, cents: i64) -> Product {
    Product {
        id,
        name: name.into(),
        category: category.into(),
        price: Decimal::new(cents, 2),
    }
}

/// The products dimension needs no old row of an update and only the key of
/// a delete, so it decodes every products event of the REPLICA IDENTITY
/// DEFAULT capture.
#[test]
fn with_replica_identity_default_products_updates_and_deletes_decode() {
    let change = |op, before, after| Some(TableChange::Product(Change { op, before, after }));
    let expected = vec![
        change(
            Op::Create,
            None,
            Some(product(101, "Milk frother", "equipment", 2995)),
        ),
        change(
            Op::Update,
            None,
            Some(product(1, "Espresso beans 1kg", "coffee", 2149)),
        ),
        change(Op::Delete, Some(ProductKey { id: 101 }), None),
        None,
        change(
            Op::Create,
            None,
            Some(product(102, "Decaf beans 250g", "coffee", 750)),
        ),
        // A primary-key change: delete + create.
        change(Op::Delete, Some(ProductKey { id: 102 }), None),
        None,
        change(
            Op::Create,
            None,
            Some(product(103, "Decaf beans 250g", "coffee", 750)),
        ),
    ];
    for name in DEFAULT_CAPTURES {
        // The changes (None: a tombstone), leaving their origins aside.
        let streamed: Vec<Option<TableChange>> = decode_all(name)
            .into_iter()
            .skip(12)
            .filter(|(table, _)| *table == Table::Products)
            .map(|(_, decoded)| match decoded.unwrap() {
                Decoded::Change(change, _) => Some(change),
                _ => None,
            })
            .collect();
        assert_eq!(streamed, expected, "{name}");
    }
}

/// The products dimension of a whole capture, as the pipeline folds it:
/// every product not deleted, with its newest row.
fn products_dimension(name: &str) -> BTreeMap<i64, Product> {
    let mut state = AggregateState::<Products>::default();
    for (offset, (_, decoded)) in decode_all(name).into_iter().enumerate() {
        if let Decoded::Change(change, origin) = decoded.unwrap_or_else(|e| {
            assert!(e.kind == DecodeErrorKind::MissingBefore, "{name}: {e}");
            Decoded::Tombstone
        }) {
            state.apply(0, offset as i64, origin, &change).unwrap();
        }
    }
    state
        .totals()
        .into_iter()
        .map(|(id, v)| {
            (
                id,
                Product {
                    id,
                    name: v.name,
                    category: v.category,
                    price: v.price,
                },
            )
        })
        .collect()
}

/// The dimension ends as the products table ends, whichever replica
/// identity the table has.
#[test]
fn the_products_dimension_is_the_final_products_table_under_either_replica_identity() {
    let seed = |id| match id {
        2 => product(2, "Pour-over kettle", "equipment", 4500),
        3 => product(3, "Paper filters x100", "supplies", 449),
        4 => product(4, "Hand grinder", "equipment", 8990),
        _ => unreachable!(),
    };
    let table = |rows: Vec<Product>| -> BTreeMap<i64, Product> {
        rows.into_iter().map(|p| (p.id, p)).collect()
    };
    // replica_identity_default.sql
    let default = table(vec![
        product(1, "Espresso beans 1kg", "coffee", 2149),
        seed(2),
        seed(3),
        seed(4),
        product(103, "Decaf beans 250g", "coffee", 750),
    ]);
    for name in DEFAULT_CAPTURES {
        assert_eq!(products_dimension(name), default, "{name}");
    }
    // scenario.sql
    let full = table(vec![
        product(1, "Espresso beans 1kg", "coffee", 2149),
        product(2, "Gooseneck kettle", "equipment", 4500),
        product(3, "Paper filters x100", "accessories", 449),
        product(4, "Hand grinder pro", "grinders", 12900),
        product(101, "Milk frother", "equipment", 2995),
    ]);
    for name in [
        "schemas_off_string.jsonl",
        "schemas_off_double.jsonl",
        "schemas_on_precise.jsonl",
    ] {
        assert_eq!(products_dimension(name), full, "{name}");
    }
}

/// The ordering argument on real captures: in each table's stream, streamed
/// positions never go down, and events that share one come from distinct
/// source rows (docs/SOURCE-POSITIONS.md). Snapshot rows all share one
/// snapshot.
#[test]
fn real_positions_never_go_down_and_ties_are_distinct_rows() {
    for name in [
        "positions/streaming-txmeta.jsonl",
        "schemas_on_precise.jsonl",
        "replica_identity_default_schemas_off_string.jsonl",
    ] {
        let mut last: BTreeMap<Table, (Position, Vec<i64>)> = BTreeMap::new();
        let mut snapshots = std::collections::BTreeSet::new();
        let mut ties = 0;
        for (table, decoded) in decode_all(name) {
            let Ok(Decoded::Change(change, origin)) = decoded else {
                continue;
            };
            match origin {
                Origin::Snapshot(snapshot) => {
                    snapshots.insert(snapshot);
                }
                Origin::Stream(position) => {
                    let (at, rows) = last.entry(table).or_default();
                    assert!(
                        position >= *at,
                        "{name}: {table} went from {at} to {position}"
                    );
                    if position > *at {
                        *at = position;
                        rows.clear();
                    } else {
                        ties += 1;
                    }
                    assert!(
                        !rows.contains(&change.row_id()),
                        "{name}: {table} row {} twice at {position}",
                        change.row_id()
                    );
                    rows.push(change.row_id());
                }
            }
        }
        assert_eq!(snapshots.len(), 1, "{name}: {snapshots:?}");
        if name.contains("streaming-txmeta") {
            // Its COPY of 5 order items shares one position.
            assert!(ties >= 4, "{name}: {ties} ties");
        }
    }
}
