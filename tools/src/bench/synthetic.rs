//! Synthetic Debezium events: a seeded store workload written the way the
//! real Postgres connector writes it (see tests/fixtures), for benchmarks.
//!
//! [`Generator`] yields Kafka messages (topic, partition, key, value) of the
//! four captured tables. Field order, the `source` block, keys (`{"id":N}`),
//! tombstones after deletes, decimals (strings with schemas off, base64
//! `precise` with schemas on) and timestamps (ISO-8601 with six fractional
//! digits and `Z`) follow the captured connector output byte for byte in
//! shape; only the values are made up. The store it plays (the same mix as
//! `loadgen`, per new order):
//!
//! - a short snapshot first (op `r`): 10 customers and up to 20 products;
//! - 1 new order (`c`, pending) with 1 to 5 lines of distinct products (`c`),
//!   in one transaction, its total the sum of its lines;
//! - its status moves pending -> paid -> shipped -> delivered over the next
//!   few orders (`u`), 10 % end cancelled (half from pending, half paid);
//! - 0.2 new customers, 0.02 customer name changes, 0.05 price changes;
//! - 0.1 quantity edits and 0.03 line deletes of a pending order (line and
//!   order total in one transaction);
//! - 0.02 deletes of a delivered or cancelled order: the order's delete, then
//!   its lines' (ON DELETE CASCADE, parent first), each followed by its
//!   tombstone.
//!
//! Products are created (`c`) just before the first line that sells them.
//! Lines sell products `1..=keys`: the first `keys` lines each sell another
//! product (a fixed permutation), later ones any, so the number of distinct
//! product ids in `order_items` is exactly `min(keys, lines)`; while new
//! products are still being introduced a new order costs about 10.5 events
//! instead of 7.5, so about 3.5 events per distinct product.
//!
//! A message goes to partition `id % partitions` of its table's topic (not
//! Kafka's murmur2 partitioner), so every event of a row is in one partition,
//! in order, as the processor needs.
//!
//! [`produce`] writes the messages into the topics of a broker.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use super::{thousands, Progress};
use crate::catalog::{Status, FIRST_NAMES, GOODS, LAST_NAMES, QUANTITIES, VARIANTS};
use etl::cdc::{Op, Table};
use etl::config::Config;

/// Whether messages carry their Connect schema (JsonConverter's
/// `schemas.enable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Schemas {
    /// `{"schema": ..., "payload": ...}`, decimals `precise` (base64).
    On,
    /// The bare envelope, decimals as strings (`decimal.handling.mode=string`,
    /// the production config).
    Off,
}

impl Schemas {
    pub fn as_str(self) -> &'static str {
        match self {
            Schemas::On => "on",
            Schemas::Off => "off",
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// Messages to yield, tombstones included.
    pub events: u64,
    pub schemas: Schemas,
    /// Partitions per topic: a message goes to `id % partitions`.
    pub partitions: i32,
    /// Distinct product ids the order lines sell (`1..=keys`).
    pub keys: u64,
    pub seed: u64,
    /// Debezium's `topic.prefix`: topics are `<prefix>.public.<table>`.
    pub prefix: String,
    /// Whether the stream starts with the snapshot's rows. A second run into
    /// the same topics continues the stream instead (Debezium does not take
    /// its snapshot again); its positions lie above the earlier seeds'.
    pub snapshot: bool,
}

impl Default for Spec {
    fn default() -> Spec {
        Spec {
            events: 1_000_000,
            schemas: Schemas::Off,
            partitions: 4,
            keys: 10_000,
            seed: 1,
            prefix: "online_store".to_owned(),
            snapshot: true,
        }
    }
}

/// The store's clock: where it starts and how far it moves per order slot.
/// Kept out of [`Spec`] so that every spec written before it stays valid;
/// [`Generator::new`] runs on [`Clock::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// Microseconds since the Unix epoch (UTC) when the stream begins.
    pub start_us: i64,
    /// Each order slot moves the clock forward by `step_us.0` up to (not
    /// including) `step_us.1` microseconds, drawn like every other choice.
    pub step_us: (i64, i64),
}

impl Default for Clock {
    /// 2024-02-01T09:00:00Z, and 20 to 80 ms per order: a busy store.
    fn default() -> Clock {
        Clock {
            start_us: CLOCK_START_US,
            step_us: (20_000, 80_000),
        }
    }
}

/// One Kafka message of a table's topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub table: Table,
    pub topic: Arc<str>,
    pub partition: i32,
    /// Its offset if its topic started empty and every message before it
    /// was produced in order.
    pub offset: i64,
    pub key: Vec<u8>,
    /// None: a tombstone.
    pub value: Option<Vec<u8>>,
    /// The change the message means; None for a tombstone.
    pub op: Option<Op>,
}

// ------------------------------------------------------------- the store --

#[derive(Debug, Clone)]
struct CustomerRow {
    first: u8,
    last: u8,
    /// A middle initial, after a name change.
    middle: Option<u8>,
    created_at_us: i64,
}

#[derive(Debug, Clone, Copy)]
struct ProductRow {
    goods: u8,
    variant: u8,
    price_cents: i64,
}

#[derive(Debug, Clone)]
struct OrderRow {
    customer_id: i64,
    status: Status,
    total_cents: i64,
    created_at_us: i64,
    updated_at_us: i64,
    lines: Vec<i64>,
    cancel_from: Option<Status>,
}

#[derive(Debug, Clone, Copy)]
struct ItemRow {
    order_id: i64,
    product_id: i64,
    quantity: i64,
    unit_price_cents: i64,
}

/// A row image to write.
#[derive(Clone, Copy)]
enum Image<'a> {
    Customer(i64, &'a CustomerRow),
    Product(i64, &'a ProductRow),
    Order(i64, &'a OrderRow),
    Item(i64, &'a ItemRow),
}

const MIDDLE: &[u8] = b"ABCDEFGHJKLMNPRSTW";

/// Customers and products of the snapshot.
const SNAPSHOT_CUSTOMERS: i64 = 10;
const SNAPSHOT_PRODUCTS: u64 = 20;
/// Delivered and cancelled orders kept as delete candidates; older ones are
/// forgotten, so memory stays flat however many events are asked for.
const FINISHED_KEPT: usize = 10_000;
/// Where the positions of seed 1 begin: every change's (commit, LSN) lies
/// above it (higher seeds' further up).
pub const FIRST_LSN: i64 = 26_497_000;
/// 2024-02-01T09:00:00Z: where the store's clock starts.
const CLOCK_START_US: i64 = 1_706_778_000_000_000;
/// The connector's `source.version`.
const DEBEZIUM_VERSION: &str = "3.6.3.Final";
/// The Postgres database (`source.db`).
const DATABASE: &str = "online_store";

/// Per-order probabilities of the other operations (as `loadgen`'s mix).
mod mix {
    pub const NEW_CUSTOMER: f64 = 0.2;
    pub const RENAME_CUSTOMER: f64 = 0.02;
    pub const PRICE_CHANGE: f64 = 0.05;
    pub const EDIT_QUANTITY: f64 = 0.1;
    pub const DELETE_LINE: f64 = 0.03;
    pub const DELETE_ORDER: f64 = 0.02;
    pub const CANCELLED: f64 = 0.1;
    pub const MAX_LINES: u64 = 5;
}

/// The seeded store and the messages it writes. An iterator of exactly
/// `spec.events` messages.
pub struct Generator {
    spec: Spec,
    rng: fastrand::Rng,
    topics: [Arc<str>; 4],
    /// With schemas on: each table's value schema and key schema, as JSON.
    value_schemas: Option<[String; 4]>,
    key_schemas: Option<[String; 4]>,
    /// Next offset per (table, partition).
    offsets: [Vec<i64>; 4],
    emitted: u64,
    queue: VecDeque<Message>,
    started: bool,
    /// New orders so far: the store's logical time in order slots.
    slot: u64,
    clock_us: i64,
    /// The clock's step per order slot (see [`Clock`]).
    step_us: (i64, i64),
    lsn: i64,
    tx_id: i64,
    /// The transaction being written: (commit time ms, first LSN).
    tx: (i64, i64),
    customers: Vec<CustomerRow>,
    /// Indexed by product id; None until created.
    products: Vec<Option<ProductRow>>,
    created_products: Vec<i64>,
    lines_sold: u64,
    stride: u64,
    next_order: i64,
    next_item: i64,
    orders: HashMap<i64, OrderRow>,
    items: HashMap<i64, ItemRow>,
    /// Next status change of each live order: (due slot, order).
    due: BinaryHeap<Reverse<(u64, i64)>>,
    /// Orders that were pending when last seen (edit candidates).
    pending: Vec<i64>,
    finished: VecDeque<i64>,
    buf: Vec<u8>,
}

fn table_index(table: Table) -> usize {
    match table {
        Table::Customers => 0,
        Table::Products => 1,
        Table::Orders => 2,
        Table::OrderItems => 3,
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Generator {
    pub fn new(spec: Spec) -> Generator {
        Generator::with_clock(spec, Clock::default())
    }

    /// The store of `spec` on another clock, e.g. orders spread over past
    /// minutes. The step is one draw per order slot whatever its range
    /// (barring a redraw, at odds below range / 2^64), so the same changes
    /// come as with [`Generator::new`], at other times.
    pub fn with_clock(spec: Spec, clock: Clock) -> Generator {
        assert!(spec.partitions > 0, "partitions must be positive");
        assert!(
            clock.step_us.0 < clock.step_us.1,
            "the clock's step must be a non-empty range"
        );
        assert!(spec.keys > 0, "keys must be positive");
        let topics = Table::ALL.map(|t| Arc::<str>::from(t.topic(&spec.prefix)));
        let (value_schemas, key_schemas) = match spec.schemas {
            Schemas::On => (
                Some(Table::ALL.map(|t| value_schema(&spec.prefix, t))),
                Some(Table::ALL.map(|t| key_schema(&spec.prefix, t))),
            ),
            Schemas::Off => (None, None),
        };
        // A stride coprime with `keys` walks every product once.
        let stride = (7919..)
            .find(|s| gcd(*s, spec.keys) == 1)
            .expect("a coprime stride");
        let partitions = spec.partitions as usize;
        Generator {
            rng: fastrand::Rng::with_seed(spec.seed),
            topics,
            value_schemas,
            key_schemas,
            offsets: std::array::from_fn(|_| vec![0; partitions]),
            emitted: 0,
            queue: VecDeque::new(),
            started: false,
            slot: 0,
            clock_us: clock.start_us,
            step_us: clock.step_us,
            // Each seed's positions above the earlier seeds' (2^36 of WAL
            // is over a hundred million events).
            lsn: FIRST_LSN + (spec.seed.saturating_sub(1) << 36) as i64,
            tx_id: 740,
            tx: (0, 0),
            customers: Vec::new(),
            products: vec![None; spec.keys as usize + 1],
            created_products: Vec::new(),
            lines_sold: 0,
            stride,
            next_order: 1,
            next_item: 1,
            orders: HashMap::new(),
            items: HashMap::new(),
            due: BinaryHeap::new(),
            pending: Vec::new(),
            finished: VecDeque::new(),
            buf: Vec::with_capacity(4096),
            spec,
        }
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// New orders so far (order slots the clock moved through).
    pub fn orders(&self) -> u64 {
        self.slot
    }

    // ------------------------------------------------------- transactions --

    fn begin(&mut self) {
        self.tx_id += 1;
        self.lsn += 56 + 8 * self.rng.i64(0..20);
        self.tx = (self.clock_us / 1000, self.lsn);
    }

    fn next_lsn(&mut self) -> i64 {
        self.lsn += 200 + 8 * self.rng.i64(0..40);
        self.lsn
    }

    /// The snapshot: customers and the first products, op `r`, in one
    /// transaction (only made, not sent, when the spec continues a stream).
    fn snapshot(&mut self) {
        self.begin();
        let lsn = self.lsn;
        let products = self.spec.keys.min(SNAPSHOT_PRODUCTS) as i64;
        for id in 1..=SNAPSHOT_CUSTOMERS {
            let row = self.new_customer_row();
            self.customers.push(row.clone());
            let marker = match id {
                1 => "first",
                SNAPSHOT_CUSTOMERS => "last_in_data_collection",
                _ => "true",
            };
            if self.spec.snapshot {
                let image = Image::Customer(id, &row);
                let value =
                    self.envelope(Table::Customers, Op::Read, None, Some(image), marker, lsn);
                self.push(Table::Customers, id, Op::Read, value);
            }
        }
        for id in 1..=products {
            let row = self.new_product_row();
            self.products[id as usize] = Some(row);
            self.created_products.push(id);
            let marker = match id {
                _ if id == products => "last",
                1 => "first_in_data_collection",
                _ => "true",
            };
            if self.spec.snapshot {
                let value = self.envelope(
                    Table::Products,
                    Op::Read,
                    None,
                    Some(Image::Product(id, &row)),
                    marker,
                    lsn,
                );
                self.push(Table::Products, id, Op::Read, value);
            }
        }
    }

    fn new_customer_row(&mut self) -> CustomerRow {
        CustomerRow {
            first: self.rng.u8(0..FIRST_NAMES.len() as u8),
            last: self.rng.u8(0..LAST_NAMES.len() as u8),
            middle: None,
            created_at_us: self.clock_us,
        }
    }

    fn new_product_row(&mut self) -> ProductRow {
        ProductRow {
            goods: self.rng.u8(0..GOODS.len() as u8),
            variant: self.rng.u8(0..VARIANTS.len() as u8),
            price_cents: self.price(),
        }
    }

    /// A shop price: 1.49 to 99.99, mostly ending in 9.
    fn price(&mut self) -> i64 {
        let euros = self.rng.i64(1..100);
        let cents = [49, 90, 95, 99, 99, 0][self.rng.usize(0..6)];
        euros * 100 + cents
    }

    /// One order slot: a new order and whatever else happens meanwhile.
    fn step(&mut self) {
        self.slot += 1;
        self.clock_us += self.rng.i64(self.step_us.0..self.step_us.1);
        if self.rng.f64() < mix::NEW_CUSTOMER {
            self.new_customer();
        }
        self.new_order();
        while let Some(Reverse((due, order))) = self.due.peek().copied() {
            if due > self.slot {
                break;
            }
            self.due.pop();
            self.advance(order);
        }
        if self.rng.f64() < mix::RENAME_CUSTOMER {
            self.rename_customer();
        }
        if self.rng.f64() < mix::PRICE_CHANGE {
            self.change_price();
        }
        if self.rng.f64() < mix::EDIT_QUANTITY {
            self.edit_quantity();
        }
        if self.rng.f64() < mix::DELETE_LINE {
            self.delete_line();
        }
        if self.rng.f64() < mix::DELETE_ORDER {
            self.delete_order();
        }
    }

    fn new_customer(&mut self) {
        self.begin();
        let row = self.new_customer_row();
        self.customers.push(row.clone());
        let id = self.customers.len() as i64;
        let lsn = self.next_lsn();
        let image = Image::Customer(id, &row);
        let value = self.envelope(
            Table::Customers,
            Op::Create,
            None,
            Some(image),
            "false",
            lsn,
        );
        self.push(Table::Customers, id, Op::Create, value);
    }

    fn rename_customer(&mut self) {
        let id = self.rng.i64(1..=self.customers.len() as i64);
        let before = self.customers[id as usize - 1].clone();
        let mut after = before.clone();
        after.middle = Some(self.rng.u8(0..MIDDLE.len() as u8));
        if after.middle == before.middle {
            return;
        }
        self.emit_update(
            Table::Customers,
            id,
            Image::Customer(id, &before),
            Image::Customer(id, &after),
        );
        self.customers[id as usize - 1] = after;
    }

    /// The product the next line sells: each of `1..=keys` once first, then
    /// any, never one already in `taken`.
    fn product_for_line(&mut self, taken: &[i64]) -> i64 {
        let keys = self.spec.keys;
        loop {
            let id = if self.lines_sold < keys {
                let id = (self.lines_sold * self.stride) % keys + 1;
                self.lines_sold += 1;
                id as i64
            } else {
                self.rng.u64(1..=keys) as i64
            };
            if !taken.contains(&id) {
                return id;
            }
        }
    }

    fn new_order(&mut self) {
        let lines = self.rng.u64(1..=mix::MAX_LINES).min(self.spec.keys) as usize;
        let mut products = Vec::with_capacity(lines);
        for _ in 0..lines {
            let id = self.product_for_line(&products);
            products.push(id);
        }
        // A product is created (its own transaction) before it is sold.
        for &id in &products {
            if self.products[id as usize].is_none() {
                self.begin();
                let row = self.new_product_row();
                self.products[id as usize] = Some(row);
                self.created_products.push(id);
                let lsn = self.next_lsn();
                let value = self.envelope(
                    Table::Products,
                    Op::Create,
                    None,
                    Some(Image::Product(id, &row)),
                    "false",
                    lsn,
                );
                self.push(Table::Products, id, Op::Create, value);
            }
        }
        let order_id = self.next_order;
        self.next_order += 1;
        let mut items = Vec::with_capacity(lines);
        for &product_id in &products {
            let price = self.products[product_id as usize]
                .expect("created")
                .price_cents;
            let item = ItemRow {
                order_id,
                product_id,
                quantity: QUANTITIES[self.rng.usize(0..QUANTITIES.len())].into(),
                unit_price_cents: price,
            };
            items.push((self.next_item, item));
            self.next_item += 1;
        }
        let cancel_from = if self.rng.f64() < mix::CANCELLED {
            Some(if self.rng.bool() {
                Status::Pending
            } else {
                Status::Paid
            })
        } else {
            None
        };
        let order = OrderRow {
            customer_id: self.rng.i64(1..=self.customers.len() as i64),
            status: Status::Pending,
            total_cents: items
                .iter()
                .map(|(_, i)| i.quantity * i.unit_price_cents)
                .sum(),
            created_at_us: self.clock_us,
            updated_at_us: self.clock_us,
            lines: items.iter().map(|(id, _)| *id).collect(),
            cancel_from,
        };
        self.begin();
        let lsn = self.next_lsn();
        let value = self.envelope(
            Table::Orders,
            Op::Create,
            None,
            Some(Image::Order(order_id, &order)),
            "false",
            lsn,
        );
        self.push(Table::Orders, order_id, Op::Create, value);
        for (item_id, item) in &items {
            let lsn = self.next_lsn();
            let value = self.envelope(
                Table::OrderItems,
                Op::Create,
                None,
                Some(Image::Item(*item_id, item)),
                "false",
                lsn,
            );
            self.push(Table::OrderItems, *item_id, Op::Create, value);
        }
        self.items.extend(items);
        self.orders.insert(order_id, order);
        self.pending.push(order_id);
        let due = self.slot + self.rng.u64(1..=8);
        self.due.push(Reverse((due, order_id)));
    }

    /// The order's next status change (cancelled or the next in line).
    fn advance(&mut self, order_id: i64) {
        let Some(before) = self.orders.get(&order_id).cloned() else {
            return;
        };
        let next = if before.cancel_from == Some(before.status) {
            Some(Status::Cancelled)
        } else {
            before.status.successor()
        };
        let Some(next) = next else { return };
        let mut after = before.clone();
        after.status = next;
        after.updated_at_us = self.clock_us;
        self.update_order(order_id, &before, after);
        match next {
            Status::Delivered | Status::Cancelled => {
                self.finished.push_back(order_id);
                if self.finished.len() > FINISHED_KEPT {
                    let old = self.finished.pop_front().expect("not empty");
                    self.forget(old);
                }
            }
            _ => {
                let due = self.slot + self.rng.u64(1..=8);
                self.due.push(Reverse((due, order_id)));
            }
        }
    }

    fn update_order(&mut self, order_id: i64, before: &OrderRow, after: OrderRow) {
        self.emit_update(
            Table::Orders,
            order_id,
            Image::Order(order_id, before),
            Image::Order(order_id, &after),
        );
        self.orders.insert(order_id, after);
    }

    /// Stops tracking an order (its rows stay in the "database").
    fn forget(&mut self, order_id: i64) {
        if let Some(order) = self.orders.remove(&order_id) {
            for line in order.lines {
                self.items.remove(&line);
            }
        }
    }

    fn change_price(&mut self) {
        let id = self.created_products[self.rng.usize(0..self.created_products.len())];
        let before = self.products[id as usize].expect("created");
        let mut after = before;
        after.price_cents = self.price();
        if after.price_cents == before.price_cents {
            return;
        }
        self.emit_update(
            Table::Products,
            id,
            Image::Product(id, &before),
            Image::Product(id, &after),
        );
        self.products[id as usize] = Some(after);
    }

    /// A pending order picked at random, forgetting the ones that moved on.
    fn pending_order(&mut self) -> Option<i64> {
        while !self.pending.is_empty() {
            let i = self.rng.usize(0..self.pending.len());
            let id = self.pending[i];
            match self.orders.get(&id) {
                Some(o) if o.status == Status::Pending => return Some(id),
                _ => {
                    self.pending.swap_remove(i);
                }
            }
        }
        None
    }

    fn edit_quantity(&mut self) {
        let Some(order_id) = self.pending_order() else {
            return;
        };
        let order = self.orders[&order_id].clone();
        let item_id = order.lines[self.rng.usize(0..order.lines.len())];
        let item = self.items[&item_id];
        let quantity = i64::from(QUANTITIES[self.rng.usize(0..QUANTITIES.len())]);
        if quantity == item.quantity {
            return;
        }
        let edited = ItemRow { quantity, ..item };
        self.emit_update(
            Table::OrderItems,
            item_id,
            Image::Item(item_id, &item),
            Image::Item(item_id, &edited),
        );
        self.items.insert(item_id, edited);
        let mut after = order.clone();
        after.total_cents += (quantity - item.quantity) * item.unit_price_cents;
        after.updated_at_us = self.clock_us;
        self.update_order_in_tx(order_id, &order, after);
    }

    /// An order update inside the transaction already begun.
    fn update_order_in_tx(&mut self, order_id: i64, before: &OrderRow, after: OrderRow) {
        let lsn = self.next_lsn();
        let value = self.envelope(
            Table::Orders,
            Op::Update,
            Some(Image::Order(order_id, before)),
            Some(Image::Order(order_id, &after)),
            "false",
            lsn,
        );
        self.push(Table::Orders, order_id, Op::Update, value);
        self.orders.insert(order_id, after);
    }

    fn delete_line(&mut self) {
        let Some(order_id) = self.pending_order() else {
            return;
        };
        let order = self.orders[&order_id].clone();
        if order.lines.len() < 2 {
            return;
        }
        let at = self.rng.usize(0..order.lines.len());
        let item_id = order.lines[at];
        let item = self.items[&item_id];
        self.begin();
        self.delete_item(item_id, &item);
        let mut after = order.clone();
        after.lines.remove(at);
        after.total_cents -= item.quantity * item.unit_price_cents;
        after.updated_at_us = self.clock_us;
        self.update_order_in_tx(order_id, &order, after);
    }

    fn delete_item(&mut self, item_id: i64, item: &ItemRow) {
        let lsn = self.next_lsn();
        let value = self.envelope(
            Table::OrderItems,
            Op::Delete,
            Some(Image::Item(item_id, item)),
            None,
            "false",
            lsn,
        );
        self.push(Table::OrderItems, item_id, Op::Delete, value);
        self.push_tombstone(Table::OrderItems, item_id);
        self.items.remove(&item_id);
    }

    fn delete_order(&mut self) {
        if self.finished.is_empty() {
            return;
        }
        let at = self.rng.usize(0..self.finished.len());
        let order_id = self.finished.remove(at).expect("in range");
        let Some(order) = self.orders.remove(&order_id) else {
            return;
        };
        self.begin();
        let lsn = self.next_lsn();
        let value = self.envelope(
            Table::Orders,
            Op::Delete,
            Some(Image::Order(order_id, &order)),
            None,
            "false",
            lsn,
        );
        self.push(Table::Orders, order_id, Op::Delete, value);
        self.push_tombstone(Table::Orders, order_id);
        // ON DELETE CASCADE: the lines follow their order.
        for item_id in order.lines {
            if let Some(item) = self.items.get(&item_id).copied() {
                self.delete_item(item_id, &item);
            }
        }
    }

    // ------------------------------------------------------------ writing --

    fn message(&mut self, table: Table, id: i64) -> Message {
        let t = table_index(table);
        let partition = (id.rem_euclid(i64::from(self.spec.partitions))) as i32;
        let slot = &mut self.offsets[t][partition as usize];
        let offset = *slot;
        *slot += 1;
        let key = match &self.key_schemas {
            Some(schemas) => format!(r#"{{"schema":{},"payload":{{"id":{id}}}}}"#, schemas[t]),
            None => format!(r#"{{"id":{id}}}"#),
        };
        Message {
            table,
            topic: self.topics[t].clone(),
            partition,
            offset,
            key: key.into_bytes(),
            value: None,
            op: None,
        }
    }

    /// One changed row in a transaction of its own: an update event.
    fn emit_update(&mut self, table: Table, id: i64, before: Image, after: Image) {
        self.begin();
        let lsn = self.next_lsn();
        let value = self.envelope(table, Op::Update, Some(before), Some(after), "false", lsn);
        self.push(table, id, Op::Update, value);
    }

    fn push(&mut self, table: Table, id: i64, op: Op, value: Vec<u8>) {
        let mut message = self.message(table, id);
        message.value = Some(value);
        message.op = Some(op);
        self.queue.push_back(message);
    }

    fn push_tombstone(&mut self, table: Table, id: i64) {
        let message = self.message(table, id);
        self.queue.push_back(message);
    }

    /// One value: the envelope (with its schema when schemas are on).
    fn envelope(
        &mut self,
        table: Table,
        op: Op,
        before: Option<Image>,
        after: Option<Image>,
        snapshot: &str,
        lsn: i64,
    ) -> Vec<u8> {
        let schemas = self.spec.schemas;
        let (commit_ms, first_lsn) = self.tx;
        let emitted_ms = commit_ms + self.rng.i64(150..400);
        let emitted_us = emitted_ms * 1000 + self.rng.i64(0..1000);
        let emitted_ns = emitted_us * 1000 + self.rng.i64(0..1000);
        let commit_us = commit_ms * 1000 + self.rng.i64(0..1000);
        let mut out = std::mem::take(&mut self.buf);
        out.clear();
        if let Some(value_schemas) = &self.value_schemas {
            out.extend_from_slice(b"{\"schema\":");
            out.extend_from_slice(value_schemas[table_index(table)].as_bytes());
            out.extend_from_slice(b",\"payload\":");
        }
        out.extend_from_slice(b"{\"before\":");
        write_image(&mut out, before, schemas);
        out.extend_from_slice(b",\"after\":");
        write_image(&mut out, after, schemas);
        out.extend_from_slice(b",\"source\":{\"version\":\"");
        out.extend_from_slice(DEBEZIUM_VERSION.as_bytes());
        out.extend_from_slice(b"\",\"connector\":\"postgresql\",\"name\":");
        write_str(&mut out, &self.spec.prefix);
        push_fmt(
            &mut out,
            format_args!(",\"ts_ms\":{commit_ms},\"snapshot\":"),
        );
        write_str(&mut out, snapshot);
        out.extend_from_slice(b",\"db\":");
        write_str(&mut out, DATABASE);
        // Debezium's [last committed LSN, this change's LSN], as a string.
        if op == Op::Read {
            push_fmt(
                &mut out,
                format_args!(",\"sequence\":\"[null,\\\"{lsn}\\\"]\""),
            );
        } else {
            push_fmt(
                &mut out,
                format_args!(",\"sequence\":\"[\\\"{first_lsn}\\\",\\\"{lsn}\\\"]\""),
            );
        }
        push_fmt(
            &mut out,
            format_args!(
                ",\"ts_us\":{commit_us},\"ts_ns\":{},\"schema\":\"public\",\"table\":\"{}\",\"txId\":{},\"lsn\":{lsn},\"xmin\":null,\"origin\":null,\"origin_lsn\":null}}",
                commit_us * 1000,
                table.name(),
                self.tx_id
            ),
        );
        push_fmt(
            &mut out,
            format_args!(
                ",\"transaction\":null,\"op\":\"{}\",\"ts_ms\":{emitted_ms},\"ts_us\":{emitted_us},\"ts_ns\":{emitted_ns}}}",
                op.as_str()
            ),
        );
        if self.value_schemas.is_some() {
            out.push(b'}');
        }
        let value = out.clone();
        self.buf = out;
        value
    }
}

impl Iterator for Generator {
    type Item = Message;

    fn next(&mut self) -> Option<Message> {
        if self.emitted >= self.spec.events {
            return None;
        }
        if !self.started {
            self.started = true;
            self.snapshot();
        }
        while self.queue.is_empty() {
            self.step();
        }
        self.emitted += 1;
        self.queue.pop_front()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.spec.events - self.emitted) as usize;
        (left, Some(left))
    }
}

fn push_fmt(out: &mut Vec<u8>, args: std::fmt::Arguments) {
    use std::io::Write as _;
    out.write_fmt(args).expect("writing to a Vec");
}

/// A JSON string (the generator's strings need no escapes but `"` and `\`).
fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for b in s.bytes() {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

/// A `numeric(_, 2)` column: `"37.49"` with schemas off (string mode), the
/// base64 of the unscaled big-endian two's-complement integer with schemas
/// on (precise mode, as Java's `BigInteger.toByteArray`).
fn write_money(out: &mut Vec<u8>, cents: i64, schemas: Schemas) {
    match schemas {
        Schemas::Off => {
            let sign = if cents < 0 { "-" } else { "" };
            let abs = cents.unsigned_abs();
            push_fmt(
                out,
                format_args!("\"{sign}{}.{:02}\"", abs / 100, abs % 100),
            );
        }
        Schemas::On => {
            out.push(b'"');
            let encoded = base64::engine::general_purpose::STANDARD.encode(twos_complement(cents));
            out.extend_from_slice(encoded.as_bytes());
            out.push(b'"');
        }
    }
}

/// The shortest big-endian two's complement of `n` (at least one byte).
fn twos_complement(n: i64) -> Vec<u8> {
    let bytes = n.to_be_bytes();
    let mut start = 0;
    while start < 7 {
        let (b, next) = (bytes[start], bytes[start + 1]);
        let redundant = (b == 0x00 && next & 0x80 == 0) || (b == 0xFF && next & 0x80 != 0);
        if !redundant {
            break;
        }
        start += 1;
    }
    bytes[start..].to_vec()
}

/// `"2024-02-01T09:00:10.250000Z"`: Debezium's ZonedTimestamp of a
/// timestamptz, in both schema modes.
fn write_timestamp(out: &mut Vec<u8>, micros: i64) {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    push_fmt(
        out,
        format_args!(
            "\"{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z\"",
            of_day / 3600,
            of_day / 60 % 60,
            of_day % 60
        ),
    );
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic
/// Gregorian; Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn write_image(out: &mut Vec<u8>, image: Option<Image>, schemas: Schemas) {
    let Some(image) = image else {
        out.extend_from_slice(b"null");
        return;
    };
    match image {
        Image::Customer(id, c) => {
            push_fmt(out, format_args!("{{\"id\":{id},\"email\":"));
            push_fmt(out, format_args!("\"customer.{id}@example.test\""));
            out.extend_from_slice(b",\"full_name\":\"");
            out.extend_from_slice(FIRST_NAMES[c.first as usize].as_bytes());
            if let Some(m) = c.middle {
                out.push(b' ');
                out.push(MIDDLE[m as usize]);
                out.push(b'.');
            }
            out.push(b' ');
            out.extend_from_slice(LAST_NAMES[c.last as usize].as_bytes());
            out.extend_from_slice(b"\",\"created_at\":");
            write_timestamp(out, c.created_at_us);
            out.push(b'}');
        }
        Image::Product(id, p) => {
            let (goods, category) = GOODS[p.goods as usize];
            push_fmt(
                out,
                format_args!(
                    "{{\"id\":{id},\"name\":\"{goods} {} #{id}\",\"category\":\"{category}\",\"price\":",
                    VARIANTS[p.variant as usize]
                ),
            );
            write_money(out, p.price_cents, schemas);
            out.push(b'}');
        }
        Image::Order(id, o) => {
            push_fmt(
                out,
                format_args!(
                    "{{\"id\":{id},\"customer_id\":{},\"status\":\"{}\",\"total_amount\":",
                    o.customer_id,
                    o.status.as_str()
                ),
            );
            write_money(out, o.total_cents, schemas);
            out.extend_from_slice(b",\"created_at\":");
            write_timestamp(out, o.created_at_us);
            out.extend_from_slice(b",\"updated_at\":");
            write_timestamp(out, o.updated_at_us);
            out.push(b'}');
        }
        Image::Item(id, i) => {
            push_fmt(
                out,
                format_args!(
                    "{{\"id\":{id},\"order_id\":{},\"product_id\":{},\"quantity\":{},\"unit_price\":",
                    i.order_id, i.product_id, i.quantity
                ),
            );
            write_money(out, i.unit_price_cents, schemas);
            out.push(b'}');
        }
    }
}

// ------------------------------------------------------------ the schemas --

const ID_COLUMN: &str = r#"{"type":"int64","optional":false,"default":0,"field":"id"}"#;

fn zoned_timestamp(field: &str) -> String {
    format!(
        r#"{{"type":"string","optional":false,"name":"io.debezium.time.ZonedTimestamp","version":1,"default":"1970-01-01T00:00:00.000000Z","field":"{field}"}}"#
    )
}

fn decimal(field: &str, precision: u32, default: Option<&str>) -> String {
    let default = default.map_or(String::new(), |d| format!(r#","default":"{d}""#));
    format!(
        r#"{{"type":"bytes","optional":false,"name":"org.apache.kafka.connect.data.Decimal","version":1,"parameters":{{"scale":"2","connect.decimal.precision":"{precision}"}}{default},"field":"{field}"}}"#
    )
}

/// The row struct's fields of a table, as the connector describes them.
fn row_fields(table: Table) -> String {
    let columns: Vec<String> = match table {
        Table::Customers => vec![
            ID_COLUMN.to_owned(),
            r#"{"type":"string","optional":false,"field":"email"}"#.to_owned(),
            r#"{"type":"string","optional":false,"field":"full_name"}"#.to_owned(),
            zoned_timestamp("created_at"),
        ],
        Table::Products => vec![
            ID_COLUMN.to_owned(),
            r#"{"type":"string","optional":false,"field":"name"}"#.to_owned(),
            r#"{"type":"string","optional":false,"field":"category"}"#.to_owned(),
            decimal("price", 10, None),
        ],
        Table::Orders => vec![
            ID_COLUMN.to_owned(),
            r#"{"type":"int64","optional":false,"field":"customer_id"}"#.to_owned(),
            r#"{"type":"string","optional":false,"default":"pending","field":"status"}"#.to_owned(),
            decimal("total_amount", 12, Some("AA==")),
            zoned_timestamp("created_at"),
            zoned_timestamp("updated_at"),
        ],
        Table::OrderItems => vec![
            ID_COLUMN.to_owned(),
            r#"{"type":"int64","optional":false,"field":"order_id"}"#.to_owned(),
            r#"{"type":"int64","optional":false,"field":"product_id"}"#.to_owned(),
            r#"{"type":"int32","optional":false,"field":"quantity"}"#.to_owned(),
            decimal("unit_price", 10, None),
        ],
    };
    columns.join(",")
}

const SOURCE_SCHEMA: &str = r#"{"type":"struct","fields":[{"type":"string","optional":false,"field":"version"},{"type":"string","optional":false,"field":"connector"},{"type":"string","optional":false,"field":"name"},{"type":"int64","optional":false,"field":"ts_ms"},{"type":"string","optional":true,"name":"io.debezium.data.Enum","version":1,"parameters":{"allowed":"true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"},"default":"false","field":"snapshot"},{"type":"string","optional":false,"field":"db"},{"type":"string","optional":true,"field":"sequence"},{"type":"int64","optional":true,"field":"ts_us"},{"type":"int64","optional":true,"field":"ts_ns"},{"type":"string","optional":false,"field":"schema"},{"type":"string","optional":false,"field":"table"},{"type":"int64","optional":true,"field":"txId"},{"type":"int64","optional":true,"field":"lsn"},{"type":"int64","optional":true,"field":"xmin"},{"type":"string","optional":true,"field":"origin"},{"type":"int64","optional":true,"field":"origin_lsn"}],"optional":false,"name":"io.debezium.connector.postgresql.Source","version":1,"field":"source"}"#;

const TRANSACTION_SCHEMA: &str = r#"{"type":"struct","fields":[{"type":"string","optional":false,"field":"id"},{"type":"int64","optional":false,"field":"total_order"},{"type":"int64","optional":false,"field":"data_collection_order"}],"optional":true,"name":"event.block","version":1,"field":"transaction"}"#;

/// The value schema of a table's envelope (JsonConverter, schemas on).
fn value_schema(prefix: &str, table: Table) -> String {
    let name = format!("{prefix}.public.{}", table.name());
    let row = row_fields(table);
    format!(
        r#"{{"type":"struct","fields":[{{"type":"struct","fields":[{row}],"optional":true,"name":"{name}.Value","field":"before"}},{{"type":"struct","fields":[{row}],"optional":true,"name":"{name}.Value","field":"after"}},{SOURCE_SCHEMA},{TRANSACTION_SCHEMA},{{"type":"string","optional":false,"field":"op"}},{{"type":"int64","optional":true,"field":"ts_ms"}},{{"type":"int64","optional":true,"field":"ts_us"}},{{"type":"int64","optional":true,"field":"ts_ns"}}],"optional":false,"name":"{name}.Envelope","version":2}}"#
    )
}

fn key_schema(prefix: &str, table: Table) -> String {
    format!(
        r#"{{"type":"struct","fields":[{ID_COLUMN}],"optional":false,"name":"{prefix}.public.{}.Key"}}"#,
        table.name()
    )
}

// -------------------------------------------------------------- producing --

/// Record batch compression for [`produce`]. (Not snappy: tansu's sqlite
/// storage fails on snappy batches.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    Lz4,
    None,
}

impl Compression {
    fn as_str(self) -> &'static str {
        match self {
            Compression::Lz4 => "lz4",
            Compression::None => "none",
        }
    }
}

/// What [`produce`] wrote.
#[derive(Debug, Clone, Default)]
pub struct Produced {
    pub messages: u64,
    /// Keys and values.
    pub bytes: u64,
    pub took: Duration,
    /// Messages per (topic, partition): the end offsets on empty topics.
    pub per_partition: HashMap<(String, i32), i64>,
}

/// Counts delivery failures.
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| e.to_string());
        }
    }
}

/// Writes `events` synthetic messages (default keys and seed) into the four
/// table topics of `prefix`; see [`produce_with`].
pub fn produce(
    brokers: &str,
    prefix: &str,
    partitions: i32,
    events: u64,
    schemas: Schemas,
) -> anyhow::Result<Produced> {
    let spec = Spec {
        events,
        schemas,
        partitions,
        prefix: prefix.to_owned(),
        ..Spec::default()
    };
    produce_with(brokers, &spec, Compression::Lz4)
}

/// Writes the messages of `spec` into its topics (which must exist with at
/// least `spec.partitions` partitions: [`create_topics`]) with a
/// high-throughput producer (acks=1, linger, large batches), waits until
/// every one is acknowledged, and fails if any was not.
pub fn produce_with(
    brokers: &str,
    spec: &Spec,
    compression: Compression,
) -> anyhow::Result<Produced> {
    produce_from(brokers, Generator::new(spec.clone()), compression)
}

/// [`produce_with`] for a generator made some other way (e.g.
/// [`Generator::with_clock`]), or a part of one.
pub fn produce_from(
    brokers: &str,
    generator: impl IntoIterator<Item = Message>,
    compression: Compression,
) -> anyhow::Result<Produced> {
    let producer: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "1")
        .set("enable.idempotence", "false")
        .set("compression.type", compression.as_str())
        // Large batches: fewer requests, and fewer record batches for a
        // broker to search (the mock cluster looks a fetch offset up by
        // walking a partition's batches).
        .set("linger.ms", "200")
        .set("batch.size", "1000000")
        .set("batch.num.messages", "100000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "120000")
        .create_with_context(Deliveries::default())
        .context("creating the Kafka producer")?;
    let started = Instant::now();
    let mut progress = Progress::new("produce");
    let mut produced = Produced::default();
    for message in generator {
        produced.bytes += (message.key.len() + message.value.as_ref().map_or(0, Vec::len)) as u64;
        *produced
            .per_partition
            .entry((message.topic.to_string(), message.partition))
            .or_insert(0) += 1;
        let mut record = BaseRecord::to(&message.topic)
            .partition(message.partition)
            .key(&message.key);
        if let Some(value) = &message.value {
            record = record.payload(value);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(20));
                }
                Err((e, _)) => bail!("producing to {}: {e}", message.topic),
            }
        }
        produced.messages += 1;
        if produced.messages % 1024 == 0 {
            producer.poll(Duration::ZERO);
        }
        progress.tick(produced.messages);
    }
    producer
        .flush(Duration::from_secs(120))
        .context("waiting for the broker to acknowledge every message")?;
    produced.took = started.elapsed();
    progress.finish(produced.messages);
    let context = producer.context();
    let failed = context.failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = context
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        bail!("{failed} messages were not delivered; the first because: {first}");
    }
    Ok(produced)
}

/// Creates the four table topics of `prefix` with `partitions` partitions
/// each through the admin API (tansu does not create topics on produce).
/// Topics that exist already are kept if they have at least `partitions`
/// partitions.
pub fn create_topics(brokers: &str, prefix: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating the Kafka admin client")?;
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(30))
        .context("reading the broker's topics")?;
    let existing: HashMap<String, usize> = metadata
        .topics()
        .iter()
        .map(|t| (t.name().to_owned(), t.partitions().len()))
        .collect();
    let names: Vec<String> = Table::ALL.iter().map(|t| t.topic(prefix)).collect();
    let mut missing = Vec::new();
    for name in &names {
        match existing.get(name) {
            Some(&n) if n >= partitions as usize => {}
            Some(&n) => bail!(
                "topic {name} has {n} partitions, fewer than the {partitions} asked for; \
                 delete it or ask for --partitions {n}"
            ),
            None => missing.push(NewTopic::new(name, partitions, TopicReplication::Fixed(1))),
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = futures::executor::block_on(admin.create_topics(&missing, &options))
        .context("creating the topics")?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, e)) => bail!("creating topic {topic}: {e}"),
        }
    }
    Ok(())
}

/// `etl-tools produce`: synthetic Debezium events into the topics of
/// ETL_KAFKA_BROKERS and ETL_TOPIC_PREFIX.
#[derive(Debug, Clone, clap::Args)]
pub struct ProduceArgs {
    /// Messages to write (tombstones included).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// JsonConverter schemas: on (decimals precise, base64) or off (strings).
    #[arg(long, value_enum, default_value_t = Schemas::Off)]
    pub schemas: Schemas,
    /// Partitions per topic; topics that do not exist are created with them.
    /// A message goes to partition id % P.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Distinct product ids sold in order_items.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Also moves the stream's positions: a higher seed's lie above a lower
    /// one's.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Start without the snapshot's rows, continuing the stream an earlier
    /// run with a lower --seed wrote (a second snapshot after streamed
    /// changes stops the processor, as Debezium's would).
    #[arg(long)]
    pub no_snapshot: bool,
    #[arg(long, value_enum, default_value_t = Compression::Lz4)]
    pub compression: Compression,
}

pub fn command(args: ProduceArgs, config: &Config) -> anyhow::Result<()> {
    if args.partitions < 1 || args.keys < 1 {
        bail!("--partitions and --keys must be at least 1");
    }
    let spec = Spec {
        events: args.events,
        schemas: args.schemas,
        partitions: args.partitions,
        keys: args.keys,
        seed: args.seed,
        prefix: config.kafka.topic_prefix.clone(),
        snapshot: !args.no_snapshot,
    };
    let brokers = &config.kafka.brokers;
    create_topics(brokers, &spec.prefix, spec.partitions)?;
    let produced = produce_with(brokers, &spec, args.compression)?;
    let secs = produced.took.as_secs_f64();
    println!(
        "produced {} messages ({:.1} MB, schemas {}) to {}.public.* in {:.2} s: {}/s",
        thousands(produced.messages),
        produced.bytes as f64 / 1e6,
        spec.schemas.as_str(),
        spec.prefix,
        secs,
        thousands((produced.messages as f64 / secs) as u64)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};

    use super::*;
    use etl::cdc::{decode_event, decode_with_serde, Decoded, TableChange};

    fn spec(events: u64, schemas: Schemas) -> Spec {
        Spec {
            events,
            schemas,
            partitions: 4,
            keys: 300,
            seed: 7,
            prefix: "online_store".to_owned(),
            snapshot: true,
        }
    }

    fn decoded(message: &Message) -> Decoded {
        decode_event(message.table, message.value.as_deref())
            .unwrap_or_else(|e| {
                panic!(
                    "{e}: {}",
                    String::from_utf8_lossy(message.value.as_deref().unwrap_or_default())
                )
            })
            .decoded
    }

    /// `bench memory` writes a second run into the same topics: it must read
    /// as the same stream going on (no second snapshot, positions above the
    /// first run's), which the aggregates take without an error or a repeat.
    #[test]
    fn a_second_run_without_the_snapshot_continues_the_stream() {
        let mut all = etl::replay::AllAggregates::default();
        let mut next: HashMap<(Table, i32), i64> = HashMap::new();
        let mut applied = 0;
        for (seed, snapshot) in [(1, true), (2, false)] {
            let spec = Spec {
                seed,
                snapshot,
                ..spec(4_000, Schemas::Off)
            };
            for message in Generator::new(spec) {
                let offset = next.entry((message.table, message.partition)).or_default();
                if let Decoded::Change(change, origin) = decoded(&message) {
                    assert!(snapshot || change.op() != etl::cdc::Op::Read);
                    let done = all
                        .apply(message.partition, *offset, origin, &change)
                        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                    assert!(!done.redelivered, "seed {seed}: a repeat");
                    applied += 1;
                }
                *offset += 1;
            }
        }
        assert!(applied > 7_000, "{applied}");
    }

    /// The core bench measures the scanner: every synthetic message must be
    /// one it reads, positions included, not one it leaves to serde.
    #[test]
    fn the_scanner_reads_every_message() {
        for schemas in [Schemas::Off, Schemas::On] {
            for message in Generator::new(spec(5_000, schemas)) {
                if let Some(value) = &message.value {
                    assert!(
                        etl::cdc::scanned(value),
                        "{}",
                        String::from_utf8_lossy(value)
                    );
                }
            }
        }
    }

    /// The scanner reads synthetic messages as the serde path does, to the
    /// error text, as they are and with random damage (the core's own test
    /// does the same on the captured connector output).
    #[test]
    fn the_scanner_agrees_with_the_serde_path_on_synthetic_messages() {
        let mut rng = fastrand::Rng::with_seed(11);
        let (mut ok, mut failed) = (0, 0);
        for (schemas, events) in [(Schemas::Off, 3_000), (Schemas::On, 600)] {
            let spec = Spec {
                events,
                keys: 50,
                schemas,
                ..Default::default()
            };
            for message in Generator::new(spec) {
                let Some(value) = &message.value else {
                    continue;
                };
                let text = || String::from_utf8_lossy(value).into_owned();
                // Undamaged, the scanner reads it and it decodes.
                assert!(etl::cdc::scanned(value), "{}", text());
                let scanner = decode_event(message.table, Some(value));
                assert!(scanner.is_ok(), "{}", text());
                assert_eq!(
                    scanner,
                    decode_with_serde(message.table, value),
                    "{}",
                    text()
                );
                for _ in 0..30 {
                    let damaged = etl_testkit::damaged(value, &mut rng);
                    let scanner = decode_event(message.table, Some(&damaged));
                    if scanner.is_ok() {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                    let serde = decode_with_serde(message.table, &damaged);
                    assert_eq!(scanner, serde, "{}", String::from_utf8_lossy(&damaged));
                }
            }
        }
        // Both outcomes were exercised.
        assert!(ok > 1_000 && failed > 1_000, "{ok} {failed}");
    }

    #[test]
    fn every_message_decodes_to_the_op_intended() {
        for schemas in [Schemas::Off, Schemas::On] {
            let mut ops = HashSet::new();
            for message in Generator::new(spec(20_000, schemas)) {
                match (decoded(&message), message.op) {
                    (Decoded::Change(change, _), Some(op)) => {
                        assert_eq!(change.op(), op);
                        ops.insert((message.table, op.as_str()));
                    }
                    (Decoded::Tombstone, None) => {
                        ops.insert((message.table, "tombstone"));
                    }
                    (other, op) => panic!("{op:?} decoded as {other:?}"),
                }
            }
            // The mix covers what the connector writes for each table.
            for expected in [
                (Table::Customers, "r"),
                (Table::Customers, "c"),
                (Table::Customers, "u"),
                (Table::Products, "r"),
                (Table::Products, "c"),
                (Table::Products, "u"),
                (Table::Orders, "c"),
                (Table::Orders, "u"),
                (Table::Orders, "d"),
                (Table::Orders, "tombstone"),
                (Table::OrderItems, "c"),
                (Table::OrderItems, "u"),
                (Table::OrderItems, "d"),
                (Table::OrderItems, "tombstone"),
            ] {
                assert!(ops.contains(&expected), "{schemas:?}: no {expected:?}");
            }
        }
    }

    #[test]
    fn schemas_on_and_off_mean_the_same_changes() {
        let off = Generator::new(spec(5_000, Schemas::Off));
        let on = Generator::new(spec(5_000, Schemas::On));
        let mut n = 0;
        for (a, b) in off.zip(on) {
            assert_eq!(
                (a.table, a.partition, a.offset),
                (b.table, b.partition, b.offset)
            );
            assert_eq!(decoded(&a), decoded(&b));
            n += 1;
        }
        assert_eq!(n, 5_000);
    }

    #[test]
    fn the_same_seed_gives_the_same_bytes() {
        let a: Vec<Message> = Generator::new(spec(3_000, Schemas::Off)).collect();
        let b: Vec<Message> = Generator::new(spec(3_000, Schemas::Off)).collect();
        assert_eq!(a, b);
        let other = Spec {
            seed: 8,
            ..spec(3_000, Schemas::Off)
        };
        let c: Vec<Message> = Generator::new(other).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn the_key_count_is_honoured() {
        for keys in [1, 7, 2_000] {
            let spec = Spec {
                keys,
                ..spec(30_000, Schemas::Off)
            };
            let mut products = BTreeSet::new();
            for message in Generator::new(spec) {
                if let Decoded::Change(TableChange::OrderItem(c), _) = decoded(&message) {
                    for item in c.before.iter().chain(c.after.iter()) {
                        products.insert(item.product_id);
                    }
                }
            }
            let expected: BTreeSet<i64> = (1..=keys as i64).collect();
            assert_eq!(products, expected, "keys {keys}");
        }
    }

    #[test]
    fn keys_partitions_and_offsets_follow_the_row_id() {
        let mut next: HashMap<(Table, i32), i64> = HashMap::new();
        for message in Generator::new(spec(5_000, Schemas::On)) {
            let key: serde_json::Value = serde_json::from_slice(&message.key).unwrap();
            let id = key["payload"]["id"].as_i64().unwrap();
            assert_eq!(key["schema"]["fields"][0]["field"], "id");
            assert_eq!(message.partition, (id % 4) as i32);
            let offset = next.entry((message.table, message.partition)).or_insert(0);
            assert_eq!(message.offset, *offset);
            *offset += 1;
        }
        let first = Generator::new(spec(1, Schemas::Off)).next().unwrap();
        assert_eq!(first.key, br#"{"id":1}"#);
    }

    /// The first captured event of `table` (tests/fixtures) and its key.
    fn captured(file: &str, table: Table) -> (serde_json::Value, serde_json::Value) {
        let path = etl_testkit::fixture(file);
        let text = std::fs::read_to_string(path).unwrap();
        let topic = table.topic("online_store");
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|r| r["topic"] == topic.as_str())
            .map(|r| (r["key"].clone(), r["value"].clone()))
            .unwrap()
    }

    /// A JSON object's field names, recursively, as sets per path (the
    /// order on the wire is checked on the text).
    fn shape(v: &serde_json::Value, path: &str, out: &mut BTreeSet<String>) {
        if let serde_json::Value::Object(map) = v {
            for (k, child) in map {
                out.insert(format!("{path}/{k}"));
                if k != "schema" {
                    shape(child, &format!("{path}/{k}"), out);
                }
            }
        }
    }

    #[test]
    fn messages_have_the_connectors_shape() {
        for (schemas, file) in [
            (Schemas::Off, "schemas_off_string.jsonl"),
            (Schemas::On, "schemas_on_precise.jsonl"),
        ] {
            let messages: Vec<Message> = Generator::new(spec(2_000, schemas)).collect();
            for table in Table::ALL {
                let (captured_key, captured_value) = captured(file, table);
                // The first event of the table (a create or a snapshot read).
                let ours = messages.iter().find(|m| m.table == table).unwrap();
                let value: serde_json::Value =
                    serde_json::from_slice(ours.value.as_ref().unwrap()).unwrap();
                let key: serde_json::Value = serde_json::from_slice(&ours.key).unwrap();
                let (mut a, mut b) = (BTreeSet::new(), BTreeSet::new());
                shape(&value, "", &mut a);
                shape(&captured_value, "", &mut b);
                assert_eq!(a, b, "{table} {schemas:?}");
                if schemas == Schemas::On {
                    // The schemas are the connector's, to the byte.
                    assert_eq!(value["schema"], captured_value["schema"], "{table}");
                    assert_eq!(key["schema"], captured_key["schema"], "{table}");
                } else {
                    assert_eq!(key, serde_json::json!({"id": 1}));
                }
                let text = String::from_utf8(ours.value.clone().unwrap()).unwrap();
                let at = |field: &str| text.find(field).unwrap_or_else(|| panic!("{field}"));
                assert!(at(r#""before":"#) < at(r#""after":"#));
                assert!(
                    at(r#""after":"#)
                        < at(
                            r#""source":{"version":"3.6.3.Final","connector":"postgresql","name":"online_store","ts_ms":"#
                        )
                );
                assert!(at(r#""source":"#) < at(r#","transaction":null,"op":""#));
            }
        }
        // Decimals as the connector's string mode writes them.
        let product = Generator::new(spec(100, Schemas::Off))
            .find(|m| m.table == Table::Products)
            .unwrap();
        let value: serde_json::Value = serde_json::from_slice(&product.value.unwrap()).unwrap();
        assert!(value["after"]["price"].as_str().unwrap().contains('.'));
        assert_eq!(value["source"]["snapshot"], "first_in_data_collection");
    }

    #[test]
    fn money_and_time_are_written_as_the_connector_does() {
        let text = |cents, schemas| {
            let mut out = Vec::new();
            write_money(&mut out, cents, schemas);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(text(3749, Schemas::Off), r#""37.49""#);
        assert_eq!(text(5, Schemas::Off), r#""0.05""#);
        // As captured from the connector (tests/fixtures): 37.49, 19.99, 0.
        assert_eq!(text(3749, Schemas::On), r#""DqU=""#);
        assert_eq!(text(1999, Schemas::On), r#""B88=""#);
        assert_eq!(text(0, Schemas::On), r#""AA==""#);
        assert_eq!(twos_complement(128), vec![0x00, 0x80]);
        assert_eq!(twos_complement(-1), vec![0xFF]);
        let mut out = Vec::new();
        write_timestamp(&mut out, 1_706_778_010_250_000);
        assert_eq!(out, br#""2024-02-01T09:00:10.250000Z""#);
        let mut out = Vec::new();
        write_timestamp(&mut out, 951_782_400_000_000);
        assert_eq!(out, br#""2000-02-29T00:00:00.000000Z""#);
    }
}
