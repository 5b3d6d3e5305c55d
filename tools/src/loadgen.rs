//! `etl-tools loadgen`: a realistic, seeded store workload written into
//! Postgres at a target rate of new orders, with `now()` timestamps so that
//! live dashboards move.
//!
//! Per new order (the pace), on average ([`mix`]): 1 new order with 1–5
//! lines whose `total_amount` is the sum of `quantity * unit_price` (one
//! statement, so one transaction); its status moves pending -> paid ->
//! shipped -> delivered over the next seconds, or to cancelled from pending or
//! paid (10 % of orders); 0.2 new customers; 0.05 product price changes (new
//! lines take the new price); 0.1 quantity edits of a pending order's line
//! (line and total in one transaction); 0.02 deletes of an old delivered or
//! cancelled order (its lines go with it, ON DELETE CASCADE).
//!
//! The decisions live in [`Model`], plain state driven by a seeded
//! `fastrand::Rng` and by a logical clock (the schedule time of each order
//! slot), so the same seed and starting catalog always give the same
//! operations; [`run`] carries them out on one connection.
//!
//! Rows it owns, and nothing else is touched: customers whose email is
//! `loadgen.<id>@example.test`, products whose name ends in ` (loadgen)`, and
//! orders of those customers. Ids come from the tables' sequences, which
//! loadgen first moves up to [`ID_BASE`] (only ever forward): the test
//! workload (`tests/workload/store_workload.py`) inserts explicit ids from
//! `1000 + seed * 100000` upwards, which sequences starting after the seed
//! data's few rows would run into within hours; above `ID_BASE` they cannot
//! (for workload seeds below 9,999,990).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rust_decimal::Decimal;
use tokio::time::Instant;

use crate::catalog::{FIRST_NAMES, GOODS, LAST_NAMES, QUANTITIES, VARIANTS};
use etl::config::ConfigError;

/// The sequences of the four tables are moved up to at least this value, far
/// above the explicit ids of the test workload (see the module docs) and
/// still exact in a JSON double (< 2^53).
pub const ID_BASE: i64 = 1_000_000_000_000;
/// Marks the products loadgen created (and may change).
pub const PRODUCT_MARK: &str = " (loadgen)";
/// Emails of the customers loadgen created: `loadgen.<id>@example.test`.
pub const EMAIL_PATTERN: &str = "loadgen.%@example.test";

/// The operation mix, per new order.
pub mod mix {
    /// New customers per order.
    pub const NEW_CUSTOMER: f64 = 0.2;
    /// Product price changes per order.
    pub const PRICE_CHANGE: f64 = 0.05;
    /// Quantity edits of a pending order's line, per order.
    pub const EDIT_QUANTITY: f64 = 0.1;
    /// Deletes of an old delivered or cancelled order, per order.
    pub const DELETE_ORDER: f64 = 0.02;
    /// Share of orders that end cancelled (half while pending, half paid).
    pub const CANCELLED: f64 = 0.1;
    /// Lines per order: 1 to this many (distinct products).
    pub const MAX_LINES: usize = 5;
}

/// Delivered and cancelled orders kept as delete candidates (the oldest are
/// forgotten beyond it, so memory stays flat on long runs).
const FINISHED_KEPT: usize = 10_000;

// ------------------------------------------------------------------ model --

pub use crate::catalog::Status;

/// How long an order waits before moving to `next`, in milliseconds.
fn delay_ms(next: Status) -> std::ops::Range<u64> {
    match next {
        Status::Paid => 1_000..4_000,
        Status::Shipped => 2_000..6_000,
        Status::Delivered => 3_000..10_000,
        Status::Cancelled => 1_000..5_000,
        Status::Pending => 0..1,
    }
}

/// The model's handles for rows; the executor maps them to database ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrderRef(pub u64);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CustomerRef(pub u32);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProductRef(pub u32);

/// One order line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub product: ProductRef,
    pub quantity: i32,
    pub unit_price: Decimal,
}

/// The sum of `quantity * unit_price`, to the cent.
pub fn total(lines: &[Line]) -> Decimal {
    lines.iter().fold(Decimal::new(0, 2), |sum, l| {
        sum + Decimal::from(l.quantity) * l.unit_price
    })
}

/// One operation, carried out as one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    NewCustomer {
        customer: CustomerRef,
        full_name: String,
    },
    NewProduct {
        product: ProductRef,
        name: String,
        category: &'static str,
        price: Decimal,
    },
    NewOrder {
        order: OrderRef,
        customer: CustomerRef,
        lines: Vec<Line>,
        total: Decimal,
    },
    SetStatus {
        order: OrderRef,
        from: Status,
        to: Status,
    },
    /// The line of `product` in a pending order, and the order's total.
    EditQuantity {
        order: OrderRef,
        product: ProductRef,
        from: i32,
        to: i32,
        old_total: Decimal,
        new_total: Decimal,
    },
    ChangePrice {
        product: ProductRef,
        from: Decimal,
        to: Decimal,
    },
    /// Deletes the order and (ON DELETE CASCADE) its `lines` lines.
    DeleteOrder {
        order: OrderRef,
        status: Status,
        lines: usize,
    },
}

/// What an operation is, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    NewOrder,
    Paid,
    Shipped,
    Delivered,
    Cancelled,
    EditQuantity,
    ChangePrice,
    NewCustomer,
    NewProduct,
    DeleteOrder,
}

impl OpKind {
    pub const ALL: [OpKind; 10] = [
        OpKind::NewOrder,
        OpKind::Paid,
        OpKind::Shipped,
        OpKind::Delivered,
        OpKind::Cancelled,
        OpKind::EditQuantity,
        OpKind::ChangePrice,
        OpKind::NewCustomer,
        OpKind::NewProduct,
        OpKind::DeleteOrder,
    ];

    /// The name in progress lines and the summary (`name=count`).
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::NewOrder => "orders",
            OpKind::Paid => "paid",
            OpKind::Shipped => "shipped",
            OpKind::Delivered => "delivered",
            OpKind::Cancelled => "cancelled",
            OpKind::EditQuantity => "quantity_edits",
            OpKind::ChangePrice => "price_changes",
            OpKind::NewCustomer => "customers",
            OpKind::NewProduct => "products",
            OpKind::DeleteOrder => "deleted",
        }
    }
}

impl Op {
    pub fn kind(&self) -> OpKind {
        match self {
            Op::NewCustomer { .. } => OpKind::NewCustomer,
            Op::NewProduct { .. } => OpKind::NewProduct,
            Op::NewOrder { .. } => OpKind::NewOrder,
            Op::SetStatus { to, .. } => match to {
                Status::Paid => OpKind::Paid,
                Status::Shipped => OpKind::Shipped,
                Status::Delivered => OpKind::Delivered,
                // The model never moves an order back to pending.
                Status::Cancelled | Status::Pending => OpKind::Cancelled,
            },
            Op::EditQuantity { .. } => OpKind::EditQuantity,
            Op::ChangePrice { .. } => OpKind::ChangePrice,
            Op::DeleteOrder { .. } => OpKind::DeleteOrder,
        }
    }
}

#[derive(Debug, Clone)]
struct Order {
    status: Status,
    /// None for orders of an earlier run, adopted to finish their lifecycle:
    /// their lines are unknown, so they are neither edited nor deleted.
    lines: Option<Vec<Line>>,
    /// The status from which the order will be cancelled, if it will be.
    cancel_from: Option<Status>,
}

impl Order {
    fn next_status(&self) -> Option<Status> {
        if self.cancel_from == Some(self.status) {
            Some(Status::Cancelled)
        } else {
            self.status.successor()
        }
    }
}

/// A set with O(1) insert, remove and uniform random pick, deterministic.
#[derive(Debug)]
struct Pool<T> {
    items: Vec<T>,
    position: HashMap<T, usize>,
}

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Pool {
            items: Vec::new(),
            position: HashMap::new(),
        }
    }
}

impl<T: Copy + Eq + std::hash::Hash> Pool<T> {
    fn insert(&mut self, item: T) {
        if !self.position.contains_key(&item) {
            self.position.insert(item, self.items.len());
            self.items.push(item);
        }
    }

    fn remove(&mut self, item: T) {
        if let Some(i) = self.position.remove(&item) {
            self.items.swap_remove(i);
            if let Some(&moved) = self.items.get(i) {
                self.position.insert(moved, i);
            }
        }
    }

    fn pick(&self, rng: &mut fastrand::Rng) -> Option<T> {
        (!self.items.is_empty()).then(|| self.items[rng.usize(..self.items.len())])
    }

    fn len(&self) -> usize {
        self.items.len()
    }
}

/// The decisions: which operation comes next, with which values. No I/O.
pub struct Model {
    rng: fastrand::Rng,
    customers: Pool<CustomerRef>,
    next_customer: u32,
    /// By `ProductRef`; None once a product's creation failed.
    prices: Vec<Option<Decimal>>,
    products: Pool<ProductRef>,
    orders: HashMap<OrderRef, Order>,
    next_order: u64,
    /// Pending orders with known lines (the ones that may be edited).
    pending: Pool<OrderRef>,
    /// Next status change of each live order: (due, order).
    due: BinaryHeap<Reverse<(u64, OrderRef)>>,
    /// Delivered and cancelled orders of this run, oldest first.
    finished: VecDeque<OrderRef>,
}

impl Model {
    /// A model over `customers` existing customers (refs 0..customers) and
    /// existing products with these prices (refs 0..len).
    pub fn new(seed: u64, customers: usize, product_prices: &[Decimal]) -> Model {
        let mut model = Model {
            rng: fastrand::Rng::with_seed(seed),
            customers: Pool::default(),
            next_customer: 0,
            prices: Vec::new(),
            products: Pool::default(),
            orders: HashMap::new(),
            next_order: 0,
            pending: Pool::default(),
            due: BinaryHeap::new(),
            finished: VecDeque::new(),
        };
        for _ in 0..customers {
            let c = model.add_customer();
            model.customers.insert(c);
        }
        for &price in product_prices {
            let p = ProductRef(model.prices.len() as u32);
            model.prices.push(Some(price));
            model.products.insert(p);
        }
        model
    }

    /// Creates customers and products until there are at least this many.
    pub fn top_up(&mut self, customers: usize, products: usize) -> Vec<Op> {
        let mut ops = Vec::new();
        while self.customers.len() < customers {
            ops.push(self.new_customer());
        }
        while self.products.len() < products {
            ops.push(self.new_product());
        }
        ops
    }

    /// Takes over an order of an earlier run in `status` so that it finishes
    /// its lifecycle, starting from logical time `from` (the caller spreads
    /// them out); it is never edited nor deleted.
    pub fn adopt(&mut self, status: Status, from: Duration) -> OrderRef {
        let order = OrderRef(self.next_order);
        self.next_order += 1;
        self.orders.insert(
            order,
            Order {
                status,
                lines: None,
                cancel_from: None,
            },
        );
        self.schedule(order, micros(from));
        order
    }

    /// The operations of one order slot at logical time `now` (the slot's
    /// schedule time since the start): one new order, status changes that
    /// are due, and now and then one of the other operations.
    pub fn step(&mut self, now: Duration) -> Vec<Op> {
        let now = micros(now);
        let mut ops = Vec::new();
        if self.rng.f64() < mix::NEW_CUSTOMER {
            ops.push(self.new_customer());
        }
        if self.rng.f64() < mix::PRICE_CHANGE {
            ops.extend(self.change_price());
        }
        ops.extend(self.new_order(now));
        if self.rng.f64() < mix::EDIT_QUANTITY {
            ops.extend(self.edit_quantity());
        }
        if self.rng.f64() < mix::DELETE_ORDER {
            ops.extend(self.delete_order());
        }
        while let Some(&Reverse((due, order))) = self.due.peek() {
            if due > now {
                break;
            }
            self.due.pop();
            ops.extend(self.advance(order, due));
        }
        ops
    }

    /// `op` did not happen in the database (an error, or the row was not as
    /// expected): undo it in the model, forgetting the order it concerned.
    pub fn rejected(&mut self, op: &Op) {
        match op {
            Op::NewCustomer { customer, .. } => self.customers.remove(*customer),
            Op::NewProduct { product, .. } => {
                self.prices[product.0 as usize] = None;
                self.products.remove(*product);
            }
            Op::ChangePrice { product, from, .. } => {
                if let Some(price) = self.prices.get_mut(product.0 as usize) {
                    if price.is_some() {
                        *price = Some(*from);
                    }
                }
            }
            Op::NewOrder { order, .. }
            | Op::SetStatus { order, .. }
            | Op::EditQuantity { order, .. }
            | Op::DeleteOrder { order, .. } => self.forget(*order),
        }
    }

    /// Whether the model still knows `order` (the executor drops the ids of
    /// orders it does not).
    pub fn knows(&self, order: OrderRef) -> bool {
        self.orders.contains_key(&order)
    }

    pub fn customers(&self) -> usize {
        self.customers.len()
    }

    pub fn products(&self) -> usize {
        self.products.len()
    }

    fn add_customer(&mut self) -> CustomerRef {
        let c = CustomerRef(self.next_customer);
        self.next_customer += 1;
        c
    }

    fn new_customer(&mut self) -> Op {
        let customer = self.add_customer();
        self.customers.insert(customer);
        let first = FIRST_NAMES[self.rng.usize(..FIRST_NAMES.len())];
        let last = LAST_NAMES[self.rng.usize(..LAST_NAMES.len())];
        Op::NewCustomer {
            customer,
            full_name: format!("{first} {last}"),
        }
    }

    fn new_product(&mut self) -> Op {
        let product = ProductRef(self.prices.len() as u32);
        let (good, category) = GOODS[self.rng.usize(..GOODS.len())];
        let variant = VARIANTS[self.rng.usize(..VARIANTS.len())];
        let price = Decimal::new(self.rng.i64(200..12_000), 2);
        self.prices.push(Some(price));
        self.products.insert(product);
        Op::NewProduct {
            product,
            name: format!("{good} {variant}{PRODUCT_MARK}"),
            category,
            price,
        }
    }

    fn change_price(&mut self) -> Option<Op> {
        let product = self.products.pick(&mut self.rng)?;
        let slot = &mut self.prices[product.0 as usize];
        let from = (*slot)?;
        // Up or down by 1 to 20 %, to the cent, at least 0.50.
        let mut cents = from;
        cents.rescale(2);
        let cents = cents.mantissa() as i64;
        let percent = self.rng.i64(1..=20) * if self.rng.bool() { 1 } else { -1 };
        let mut new_cents = ((cents * (100 + percent) + 50) / 100).max(50);
        if new_cents == cents {
            new_cents += 1;
        }
        let to = Decimal::new(new_cents, 2);
        *slot = Some(to);
        Some(Op::ChangePrice { product, from, to })
    }

    /// A product, popular ones (low refs) more often.
    fn pick_product(&mut self) -> Option<ProductRef> {
        let n = self.products.len();
        if n == 0 {
            return None;
        }
        let skewed = (self.rng.f64().powi(2) * n as f64) as usize;
        Some(self.products.items[skewed.min(n - 1)])
    }

    fn new_order(&mut self, now: u64) -> Option<Op> {
        let customer = self.customers.pick(&mut self.rng)?;
        let count = self.rng.usize(1..=mix::MAX_LINES).min(self.products.len());
        let mut lines: Vec<Line> = Vec::with_capacity(count);
        while lines.len() < count {
            let product = self.pick_product()?;
            if lines.iter().any(|l| l.product == product) {
                continue;
            }
            lines.push(Line {
                product,
                quantity: QUANTITIES[self.rng.usize(..QUANTITIES.len())],
                unit_price: self.prices[product.0 as usize]?,
            });
        }
        let cancel_from = (self.rng.f64() < mix::CANCELLED).then(|| {
            if self.rng.bool() {
                Status::Pending
            } else {
                Status::Paid
            }
        });
        let order = OrderRef(self.next_order);
        self.next_order += 1;
        let total = total(&lines);
        self.orders.insert(
            order,
            Order {
                status: Status::Pending,
                lines: Some(lines.clone()),
                cancel_from,
            },
        );
        self.pending.insert(order);
        self.schedule(order, now);
        Some(Op::NewOrder {
            order,
            customer,
            lines,
            total,
        })
    }

    fn schedule(&mut self, order: OrderRef, after: u64) {
        let Some(next) = self.orders.get(&order).and_then(Order::next_status) else {
            return;
        };
        let delay = self.rng.u64(delay_ms(next)) * 1_000;
        self.due.push(Reverse((after + delay, order)));
    }

    fn advance(&mut self, order: OrderRef, due: u64) -> Option<Op> {
        let entry = self.orders.get_mut(&order)?;
        let from = entry.status;
        let to = entry.next_status()?;
        entry.status = to;
        let adopted = entry.lines.is_none();
        if from == Status::Pending {
            self.pending.remove(order);
        }
        if to.is_final() {
            if adopted {
                self.orders.remove(&order);
            } else {
                self.finished.push_back(order);
                if self.finished.len() > FINISHED_KEPT {
                    if let Some(oldest) = self.finished.pop_front() {
                        self.orders.remove(&oldest);
                    }
                }
            }
        } else {
            self.schedule(order, due);
        }
        Some(Op::SetStatus { order, from, to })
    }

    fn edit_quantity(&mut self) -> Option<Op> {
        let order = self.pending.pick(&mut self.rng)?;
        let lines = self.orders.get_mut(&order)?.lines.as_mut()?;
        let old_total = total(lines);
        let i = self.rng.usize(..lines.len());
        let line = &mut lines[i];
        let from = line.quantity;
        let mut to = self.rng.i32(1..=4);
        if to >= from {
            to += 1; // 1..=5 without `from`
        }
        line.quantity = to;
        let product = line.product;
        let new_total = total(lines);
        Some(Op::EditQuantity {
            order,
            product,
            from,
            to,
            old_total,
            new_total,
        })
    }

    fn delete_order(&mut self) -> Option<Op> {
        if self.finished.len() < 5 {
            return None;
        }
        // An old one: from the older half.
        let i = self.rng.usize(..self.finished.len().div_ceil(2));
        let order = self.finished.remove(i)?;
        let gone = self.orders.remove(&order)?;
        Some(Op::DeleteOrder {
            order,
            status: gone.status,
            lines: gone.lines.map_or(0, |l| l.len()),
        })
    }

    fn forget(&mut self, order: OrderRef) {
        if self.orders.remove(&order).is_some() {
            self.pending.remove(order);
            if let Some(i) = self.finished.iter().position(|o| *o == order) {
                self.finished.remove(i);
            }
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

// ------------------------------------------------------------------- CLI --

/// `etl-tools loadgen` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// New orders per second (0: exit at once, e.g. to turn it off).
    #[arg(long, default_value_t = 5.0, value_parser = parse_rate, allow_negative_numbers = true)]
    pub rate: f64,
    /// Seed of the operation sequence (default: from the clock; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after this many seconds (default: run until SIGTERM/SIGINT).
    #[arg(long, value_parser = parse_seconds)]
    pub duration: Option<Duration>,
    /// Customers to have before starting (created if fewer exist).
    #[arg(long, default_value_t = 50)]
    pub customers: usize,
    /// Products to have before starting (created if fewer exist).
    #[arg(long, default_value_t = 30)]
    pub products: usize,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!("{s:?} is not a number of orders per second >= 0")),
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?} is not a number of seconds > 0")),
    }
}

/// The `loadgen` subcommand: exit 0 at once for `--rate 0`; exit 2 without
/// `ETL_POSTGRES_URL`; otherwise runs on the runtime `runtime` builds.
pub fn command(
    args: Args,
    postgres_url: Result<&str, ConfigError>,
    runtime: impl FnOnce() -> std::io::Result<tokio::runtime::Runtime>,
) -> anyhow::Result<ExitCode> {
    if args.rate == 0.0 {
        eprintln!("loadgen: --rate 0: nothing to do");
        return Ok(ExitCode::SUCCESS);
    }
    let url = match postgres_url {
        Ok(url) => url,
        Err(ConfigError::Missing { name, .. }) => {
            let e = ConfigError::Missing {
                name,
                why: "loadgen writes the store's tables (e.g. postgres://user@host:5432/online_store)"
                    .into(),
            };
            eprintln!("etl-tools: {e}");
            return Ok(ExitCode::from(2));
        }
        Err(e) => {
            eprintln!("etl-tools: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if let Err(e) = url.parse::<tokio_postgres::Config>() {
        eprintln!("etl-tools: setting ETL_POSTGRES_URL: not a valid Postgres URL: {e}");
        return Ok(ExitCode::from(2));
    }
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let options = Options {
        rate: args.rate,
        seed,
        duration: args.duration,
        customers: args.customers,
        products: args.products,
    };
    let summary = runtime()?.block_on(run(url, options))?;
    eprintln!("{summary}");
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Clone)]
pub struct Options {
    pub rate: f64,
    pub seed: u64,
    pub duration: Option<Duration>,
    pub customers: usize,
    pub products: usize,
}

// ------------------------------------------------------------- counting --

/// Operations done, lines written and failures, for progress and summary.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    pub done: BTreeMap<OpKind, u64>,
    /// Lines inserted with new orders.
    pub lines: u64,
    /// Lines removed with deleted orders.
    pub lines_deleted: u64,
    /// Operations that did not happen, by `operation/reason`.
    pub failed: BTreeMap<String, u64>,
}

impl Totals {
    pub fn get(&self, kind: OpKind) -> u64 {
        self.done.get(&kind).copied().unwrap_or(0)
    }

    fn count(&mut self, op: &Op) {
        *self.done.entry(op.kind()).or_default() += 1;
        match op {
            Op::NewOrder { lines, .. } => self.lines += lines.len() as u64,
            Op::DeleteOrder { lines, .. } => self.lines_deleted += *lines as u64,
            _ => {}
        }
    }

    /// Counts a failure; true the first time of its kind (to log it once).
    fn fail(&mut self, kind: String) -> bool {
        let n = self.failed.entry(kind).or_default();
        *n += 1;
        *n == 1
    }
}

impl fmt::Display for Totals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, kind) in OpKind::ALL.into_iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}={}", kind.as_str(), self.get(kind))?;
            if kind == OpKind::NewOrder {
                write!(f, " lines={}", self.lines)?;
            }
            if kind == OpKind::DeleteOrder {
                write!(f, " lines_deleted={}", self.lines_deleted)?;
            }
        }
        let failed: u64 = self.failed.values().sum();
        write!(f, " failed={failed}")?;
        if failed > 0 {
            let each: Vec<String> = self
                .failed
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            write!(f, " ({})", each.join(", "))?;
        }
        Ok(())
    }
}

/// The final report; its line is what tests parse.
#[derive(Debug, Clone)]
pub struct Summary {
    pub seed: u64,
    pub target: f64,
    pub elapsed: Duration,
    pub totals: Totals,
}

impl Summary {
    /// New orders per second achieved.
    pub fn achieved(&self) -> f64 {
        self.totals.get(OpKind::NewOrder) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "loadgen: summary: seed={} elapsed={:.2}s target={}/s achieved={:.1}/s {}",
            self.seed,
            self.elapsed.as_secs_f64(),
            self.target,
            self.achieved(),
            self.totals
        )
    }
}

// -------------------------------------------------------------- database --

const NEW_ORDER: &str = "\
WITH o AS (
    INSERT INTO orders (customer_id, status, total_amount, created_at, updated_at)
    VALUES ($1, 'pending', $2::text::numeric, now(), now())
    RETURNING id),
i AS (
    INSERT INTO order_items (order_id, product_id, quantity, unit_price)
    SELECT o.id, t.product_id, t.quantity, t.unit_price::numeric
    FROM o, unnest($3::bigint[], $4::int[], $5::text[]) AS t(product_id, quantity, unit_price))
SELECT id FROM o";
const SET_STATUS: &str =
    "UPDATE orders SET status = $2, updated_at = now() WHERE id = $1 AND status = $3";
const EDIT_ORDER: &str = "UPDATE orders SET total_amount = $2::text::numeric, updated_at = now() \
     WHERE id = $1 AND status = 'pending' AND total_amount = $3::text::numeric";
const EDIT_LINE: &str = "UPDATE order_items SET quantity = $3 \
     WHERE order_id = $1 AND product_id = $2 AND quantity = $4";
const CHANGE_PRICE: &str = "UPDATE products SET price = $2::text::numeric WHERE id = $1";
const DELETE_ORDER: &str = "DELETE FROM orders WHERE id = $1 AND status = $2";
const NEW_CUSTOMER: &str = "\
INSERT INTO customers (id, email, full_name, created_at)
SELECT n, 'loadgen.' || n || '@example.test', $1, now()
FROM nextval(pg_get_serial_sequence('customers', 'id')) AS n
RETURNING id";
const NEW_PRODUCT: &str =
    "INSERT INTO products (name, category, price) VALUES ($1, $2, $3::text::numeric) RETURNING id";
/// Moves each table's sequence up to `$1` unless it is there already.
const SEQUENCES_UP: &str = "\
SELECT setval(s, $1, false)
FROM (SELECT pg_get_serial_sequence(t, 'id')::regclass AS s
      FROM unnest(ARRAY['customers', 'products', 'orders', 'order_items']) AS t) AS q
WHERE coalesce(pg_sequence_last_value(s), 0) < $1";

struct Statements {
    new_order: tokio_postgres::Statement,
    set_status: tokio_postgres::Statement,
    edit_order: tokio_postgres::Statement,
    edit_line: tokio_postgres::Statement,
    change_price: tokio_postgres::Statement,
    delete_order: tokio_postgres::Statement,
    new_customer: tokio_postgres::Statement,
    new_product: tokio_postgres::Statement,
}

struct Db {
    client: tokio_postgres::Client,
    st: Statements,
}

/// Model refs -> database ids.
#[derive(Default)]
struct Ids {
    customers: HashMap<CustomerRef, i64>,
    products: HashMap<ProductRef, i64>,
    orders: HashMap<OrderRef, i64>,
}

enum Failure {
    Db(tokio_postgres::Error),
    /// The row was not as the model expected (changed or deleted by someone
    /// else); nothing was written.
    Stale,
    /// The customer, product or order it concerns was never created (that
    /// earlier operation failed, e.g. in the same step); not attempted.
    Orphan,
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Db(e)
    }
}

/// The error with its causes, and the server's message for database errors.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    }
    use std::fmt::Write as _;
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(text, ": {s}");
        source = s.source();
    }
    text
}

/// The `application_name` of loadgen's sessions unless the URL sets one.
pub const APPLICATION_NAME: &str = "etl-tools loadgen";

async fn connect(url: &str) -> Result<Db, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    if config.get_application_name().is_none() {
        config.application_name(APPLICATION_NAME);
    }
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("loadgen: Postgres connection ended: {}", describe(&e));
        }
    });
    client.query(SEQUENCES_UP, &[&ID_BASE]).await?;
    let st = Statements {
        new_order: client.prepare(NEW_ORDER).await?,
        set_status: client.prepare(SET_STATUS).await?,
        edit_order: client.prepare(EDIT_ORDER).await?,
        edit_line: client.prepare(EDIT_LINE).await?,
        change_price: client.prepare(CHANGE_PRICE).await?,
        delete_order: client.prepare(DELETE_ORDER).await?,
        new_customer: client.prepare(NEW_CUSTOMER).await?,
        new_product: client.prepare(NEW_PRODUCT).await?,
    };
    Ok(Db { client, st })
}

/// SIGTERM/SIGINT (or the end of `--duration`) asks the loop to stop after
/// the current transaction.
#[derive(Clone, Default)]
struct Stop {
    flag: Arc<AtomicBool>,
    /// Set when a signal asked for the stop (not `--duration`).
    signalled: Arc<AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
}

impl Stop {
    fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Waits until `deadline`; false if asked to stop first.
    async fn sleep_until(&self, deadline: Instant) -> bool {
        let notified = self.notify.notified();
        if self.is_set() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => !self.is_set(),
            _ = notified => false,
        }
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

/// Connects, retrying with backoff (100 ms doubling to 5 s) until it works
/// or a stop is asked for.
async fn connect_with_retry(url: &str, stop: &Stop, reason: &str) -> Option<Db> {
    let mut delay = Duration::from_millis(100);
    loop {
        match connect(url).await {
            Ok(db) => return Some(db),
            Err(e) => {
                tracing::warn!(
                    "loadgen: {reason}: cannot use Postgres ({}); retrying in {delay:?}",
                    describe(&e)
                );
                if !stop.sleep_until(Instant::now() + delay).await {
                    return None;
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Loads what earlier runs left: loadgen's customers, its products with
/// their prices, and its orders still on their way (to adopt).
async fn load_catalog(
    db: &Db,
) -> Result<(Vec<i64>, Vec<(i64, Decimal)>, Vec<(i64, Status)>), anyhow::Error> {
    let customers = db
        .client
        .query(
            "SELECT id FROM customers WHERE email LIKE $1 ORDER BY id",
            &[&EMAIL_PATTERN],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut products = Vec::new();
    for row in db
        .client
        .query(
            "SELECT id, price::text FROM products WHERE name LIKE $1 ORDER BY id",
            &[&format!("%{PRODUCT_MARK}")],
        )
        .await?
    {
        let price: &str = row.get(1);
        products.push((row.get(0), Decimal::from_str(price)?));
    }
    let mut open = Vec::new();
    for row in db
        .client
        .query(
            "SELECT o.id, o.status FROM orders o JOIN customers c ON c.id = o.customer_id \
             WHERE c.email LIKE $1 AND o.status IN ('pending', 'paid', 'shipped') \
             ORDER BY o.id DESC LIMIT 10000",
            &[&EMAIL_PATTERN],
        )
        .await?
    {
        let status: &str = row.get(1);
        open.push((row.get(0), status.parse().map_err(anyhow::Error::msg)?));
    }
    Ok((customers, products, open))
}

async fn apply(db: &mut Db, ids: &mut Ids, op: &Op) -> Result<(), Failure> {
    let order_id = |ids: &Ids, o: &OrderRef| ids.orders.get(o).copied().ok_or(Failure::Orphan);
    let product_id =
        |ids: &Ids, p: &ProductRef| ids.products.get(p).copied().ok_or(Failure::Orphan);
    let one = |n: u64| if n == 1 { Ok(()) } else { Err(Failure::Stale) };
    match op {
        Op::NewCustomer {
            customer,
            full_name,
        } => {
            let row = db
                .client
                .query_one(&db.st.new_customer, &[full_name])
                .await?;
            ids.customers.insert(*customer, row.get(0));
        }
        Op::NewProduct {
            product,
            name,
            category,
            price,
        } => {
            let row = db
                .client
                .query_one(&db.st.new_product, &[name, category, &price.to_string()])
                .await?;
            ids.products.insert(*product, row.get(0));
        }
        Op::NewOrder {
            order,
            customer,
            lines,
            total,
        } => {
            let customer = ids
                .customers
                .get(customer)
                .copied()
                .ok_or(Failure::Orphan)?;
            let products = lines
                .iter()
                .map(|l| product_id(ids, &l.product))
                .collect::<Result<Vec<i64>, _>>()?;
            let quantities: Vec<i32> = lines.iter().map(|l| l.quantity).collect();
            let prices: Vec<String> = lines.iter().map(|l| l.unit_price.to_string()).collect();
            let row = db
                .client
                .query_one(
                    &db.st.new_order,
                    &[
                        &customer,
                        &total.to_string(),
                        &products,
                        &quantities,
                        &prices,
                    ],
                )
                .await?;
            ids.orders.insert(*order, row.get(0));
        }
        Op::SetStatus { order, from, to } => {
            let id = order_id(ids, order)?;
            one(db
                .client
                .execute(&db.st.set_status, &[&id, &to.as_str(), &from.as_str()])
                .await?)?;
        }
        Op::EditQuantity {
            order,
            product,
            from,
            to,
            old_total,
            new_total,
        } => {
            let id = order_id(ids, order)?;
            let product = product_id(ids, product)?;
            let tx = db.client.transaction().await?;
            let orders = tx
                .execute(
                    &db.st.edit_order,
                    &[&id, &new_total.to_string(), &old_total.to_string()],
                )
                .await?;
            let lines = if orders == 1 {
                tx.execute(&db.st.edit_line, &[&id, &product, to, from])
                    .await?
            } else {
                0
            };
            if orders == 1 && lines == 1 {
                tx.commit().await?;
            } else {
                tx.rollback().await?;
                return Err(Failure::Stale);
            }
        }
        Op::ChangePrice { product, to, .. } => {
            let id = product_id(ids, product)?;
            one(db
                .client
                .execute(&db.st.change_price, &[&id, &to.to_string()])
                .await?)?;
        }
        Op::DeleteOrder { order, status, .. } => {
            let id = order_id(ids, order)?;
            one(db
                .client
                .execute(&db.st.delete_order, &[&id, &status.as_str()])
                .await?)?;
            ids.orders.remove(order);
        }
    }
    Ok(())
}

/// Carries out ops, counting them; a failed one is undone in the model,
/// logged once per kind and counted. A lost connection is re-established
/// (with backoff) before the next op; false if a stop came meanwhile.
struct Executor<'a> {
    url: &'a str,
    db: Db,
    ids: Ids,
    totals: Totals,
    stop: Stop,
}

impl Executor<'_> {
    async fn run(&mut self, model: &mut Model, op: Op) -> bool {
        match apply(&mut self.db, &mut self.ids, &op).await {
            Ok(()) => self.totals.count(&op),
            Err(failure) => {
                model.rejected(&op);
                let what = op.kind().as_str();
                let lost = match &failure {
                    Failure::Db(e) => connection_lost(e, &self.db.client),
                    _ => self.db.client.is_closed(),
                };
                let (kind, text) = match &failure {
                    Failure::Stale => (
                        format!("{what}/stale"),
                        "the row was not as expected (changed by someone else?); skipped".into(),
                    ),
                    Failure::Orphan => (
                        format!("{what}/orphan"),
                        "what it concerns was never created (an earlier operation failed); not attempted"
                            .into(),
                    ),
                    Failure::Db(e) => {
                        let code = if lost {
                            "connection".to_owned()
                        } else {
                            e.code()
                                .map_or_else(|| "client".to_owned(), |c| c.code().to_owned())
                        };
                        (format!("{what}/{code}"), describe(e))
                    }
                };
                if self.totals.fail(kind.clone()) {
                    tracing::warn!(
                        "loadgen: {kind}: {text} (logged once per kind, counted in the summary)"
                    );
                }
                if lost {
                    tracing::warn!("loadgen: lost the connection to Postgres; reconnecting");
                    match connect_with_retry(self.url, &self.stop, "reconnecting").await {
                        Some(db) => {
                            tracing::warn!("loadgen: reconnected to Postgres");
                            self.db = db;
                        }
                        None => return false,
                    }
                }
            }
        }
        true
    }
}

/// Whether `e` means the session is gone: the client saw it close, or the
/// server said so (class 08, connection exception; 57P, e.g. 57P01 when an
/// administrator ended the session) before the client noticed.
fn connection_lost(e: &tokio_postgres::Error, client: &tokio_postgres::Client) -> bool {
    client.is_closed()
        || e.is_closed()
        || e.code()
            .is_some_and(|c| c.code().starts_with("08") || c.code().starts_with("57P"))
}

/// Runs the workload until SIGTERM/SIGINT or the end of `duration`.
pub async fn run(url: &str, options: Options) -> anyhow::Result<Summary> {
    anyhow::ensure!(
        options.rate.is_finite() && options.rate > 0.0,
        "the rate must be > 0"
    );
    let stop = Stop::default();
    let signals = stop.clone();
    tokio::spawn(async move {
        let signal = shutdown_signal().await;
        eprintln!("loadgen: {signal}: stopping after the current transaction");
        signals.signalled.store(true, Ordering::SeqCst);
        signals.set();
    });
    // --duration bounds the generating loop; until it starts (connecting,
    // the top-up), the same bound applies from now, so an unreachable
    // database does not keep a bounded run going.
    let startup_bound = options.duration.map(|duration| {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            stop.set();
        })
    });
    eprintln!(
        "loadgen: seed={} rate={}/s duration={} customers>={} products>={}",
        options.seed,
        options.rate,
        options
            .duration
            .map_or("until SIGTERM/SIGINT".to_owned(), |d| format!(
                "{:.1}s",
                d.as_secs_f64()
            )),
        options.customers,
        options.products
    );
    let Some(db) = connect_with_retry(url, &stop, "starting").await else {
        // Asked to stop while waiting for the database: nothing was written.
        anyhow::ensure!(
            stop.signalled.load(Ordering::SeqCst),
            "Postgres could not be reached within --duration (setting ETL_POSTGRES_URL)"
        );
        return Ok(Summary {
            seed: options.seed,
            target: options.rate,
            elapsed: Duration::ZERO,
            totals: Totals::default(),
        });
    };
    let (customers, products, open) = load_catalog(&db)
        .await
        .context("reading loadgen's rows of earlier runs")?;
    let prices: Vec<Decimal> = products.iter().map(|(_, p)| *p).collect();
    let mut model = Model::new(options.seed, customers.len(), &prices);
    let mut ids = Ids::default();
    for (i, id) in customers.iter().enumerate() {
        ids.customers.insert(CustomerRef(i as u32), *id);
    }
    for (i, (id, _)) in products.iter().enumerate() {
        ids.products.insert(ProductRef(i as u32), *id);
    }
    // One adopted order per order slot, so that thousands left by earlier
    // runs do not all move at once.
    for (i, (id, status)) in open.iter().enumerate() {
        let from = Duration::from_secs_f64(i as f64 / options.rate);
        ids.orders.insert(model.adopt(*status, from), *id);
    }
    let mut exec = Executor {
        url,
        db,
        ids,
        totals: Totals::default(),
        stop: stop.clone(),
    };
    for op in model.top_up(options.customers, options.products) {
        if stop.is_set() || !exec.run(&mut model, op).await {
            break;
        }
    }
    if let Some(timer) = startup_bound {
        timer.abort();
    }
    eprintln!(
        "loadgen: {} customers, {} products ({} existed), {} orders of earlier runs to finish",
        model.customers(),
        model.products(),
        prices.len(),
        open.len()
    );
    anyhow::ensure!(
        stop.is_set() || (model.customers() > 0 && model.products() > 0),
        "no customers or products to take orders with (see the errors above)"
    );

    // Token bucket: slot k is due at start + k / rate; a backlog of more
    // than a second's worth (or 1 slot) is dropped, not burst through.
    let period = Duration::from_secs_f64(1.0 / options.rate);
    let burst = Duration::from_secs(1).max(period);
    let start = Instant::now();
    let end = options.duration.map(|d| start + d);
    let mut next = start;
    let report_every = Duration::from_secs(5);
    let mut next_report = start + report_every;
    let mut last_orders = 0;
    let mut dropped_slots = 0u64;
    while !stop.is_set() {
        let now = Instant::now();
        if end.is_some_and(|end| now >= end) {
            break;
        }
        if now >= next_report {
            let orders = exec.totals.get(OpKind::NewOrder);
            eprintln!(
                "loadgen: {:.0}s {:.1} orders/s (last 5s {:.1}/s) {}",
                (now - start).as_secs_f64(),
                orders as f64 / (now - start).as_secs_f64(),
                (orders - last_orders) as f64 / report_every.as_secs_f64(),
                exec.totals
            );
            last_orders = orders;
            next_report += report_every;
            exec.ids.orders.retain(|o, _| model.knows(*o));
            continue;
        }
        if next > now {
            let wake = next.min(next_report);
            if !stop
                .sleep_until(end.map_or(wake, |end| wake.min(end)))
                .await
            {
                break;
            }
            continue;
        }
        if now - next > burst {
            let behind = now - next;
            dropped_slots += (behind.as_secs_f64() * options.rate) as u64;
            next = now;
        }
        for op in model.step(next - start) {
            let over = end.is_some_and(|end| Instant::now() >= end);
            if over || stop.is_set() || !exec.run(&mut model, op).await {
                break;
            }
        }
        next += period;
    }
    let elapsed = start.elapsed();
    if dropped_slots > 0 {
        eprintln!(
            "loadgen: could not keep up with {}/s: {dropped_slots} order slots skipped",
            options.rate
        );
    }
    Ok(Summary {
        seed: options.seed,
        target: options.rate,
        elapsed,
        totals: exec.totals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prices(n: usize) -> Vec<Decimal> {
        (0..n)
            .map(|i| Decimal::new(199 + 250 * i as i64, 2))
            .collect()
    }

    /// `steps` slots of a model at 40 orders/s, with its top-up first.
    fn drive(seed: u64, steps: usize) -> Vec<Op> {
        let mut model = Model::new(seed, 3, &prices(4));
        let mut ops = model.top_up(50, 30);
        for k in 0..steps {
            ops.extend(model.step(Duration::from_millis(25 * k as u64)));
        }
        ops
    }

    #[test]
    fn the_same_seed_gives_the_same_operations() {
        let a = drive(7, 3_000);
        assert_eq!(a, drive(7, 3_000));
        assert_ne!(a, drive(8, 3_000));
    }

    #[test]
    fn the_top_up_creates_only_what_is_missing() {
        let mut model = Model::new(1, 3, &prices(4));
        let ops = model.top_up(50, 30);
        let customers = ops
            .iter()
            .filter(|o| matches!(o, Op::NewCustomer { .. }))
            .count();
        let products = ops
            .iter()
            .filter(|o| matches!(o, Op::NewProduct { .. }))
            .count();
        assert_eq!((customers, products), (47, 26));
        assert!(model.top_up(10, 10).is_empty());
        for op in &ops {
            if let Op::NewProduct { name, price, .. } = op {
                assert!(name.ends_with(PRODUCT_MARK), "{name}");
                assert!(*price >= Decimal::new(200, 2) && price.scale() == 2);
            }
        }
    }

    #[test]
    fn the_operation_mix_is_within_bounds() {
        let steps = 10_000;
        let ops = drive(42, steps);
        let mut counts: BTreeMap<OpKind, usize> = BTreeMap::new();
        let mut lines = 0;
        for op in &ops {
            *counts.entry(op.kind()).or_default() += 1;
            if let Op::NewOrder { lines: l, .. } = op {
                assert!((1..=mix::MAX_LINES).contains(&l.len()));
                lines += l.len();
            }
        }
        let n = |k| counts.get(&k).copied().unwrap_or(0);
        let within = |k: OpKind, lo: usize, hi: usize| {
            assert!(
                (lo..=hi).contains(&n(k)),
                "{k:?}: {} not in {lo}..={hi}",
                n(k)
            );
        };
        assert_eq!(n(OpKind::NewOrder), steps);
        // 1..=5 lines, 3 on average.
        assert!(
            (2.8..=3.2).contains(&(lines as f64 / steps as f64)),
            "{lines}"
        );
        within(OpKind::NewCustomer, 47 + 1_800, 47 + 2_200);
        within(OpKind::ChangePrice, 400, 600);
        within(OpKind::EditQuantity, 800, 1_200);
        // Deletes need finished orders: none in the first ~10 s (400 slots).
        within(OpKind::DeleteOrder, 140, 240);
        // Cancelled: ~10 % of orders; the rest pay; most of the run's orders
        // finish within the 250 s (the last ~20 s are still on their way).
        within(OpKind::Cancelled, 850, 1_150);
        within(OpKind::Paid, 9_300, 9_600);
        within(OpKind::Delivered, 8_300, 9_000);
        assert!(n(OpKind::Shipped) >= n(OpKind::Delivered));
    }

    /// Replays ops on a shadow of the database: order totals, statuses and
    /// which rows exist, checking each op against it.
    #[test]
    fn totals_match_lines_and_statuses_only_move_forward() {
        for seed in 0..20 {
            let mut model = Model::new(seed, 2, &prices(3));
            let mut orders: HashMap<OrderRef, (Status, Vec<Line>, Decimal)> = HashMap::new();
            let mut prices_now: HashMap<ProductRef, Decimal> = (0..3)
                .map(|i| (ProductRef(i), prices(3)[i as usize]))
                .collect();
            let mut ops = model.top_up(10, 8);
            let mut seen_forward = 0;
            for k in 0..2_000u64 {
                ops.extend(model.step(Duration::from_millis(k * 40)));
                for op in ops.drain(..) {
                    match op {
                        Op::NewProduct { product, price, .. } => {
                            prices_now.insert(product, price);
                        }
                        Op::ChangePrice { product, from, to } => {
                            assert_eq!(prices_now.insert(product, to), Some(from));
                            assert!(to >= Decimal::new(50, 2) && to != from);
                        }
                        Op::NewOrder {
                            order,
                            lines,
                            total: t,
                            ..
                        } => {
                            assert_eq!(t, total(&lines), "seed {seed}");
                            for l in &lines {
                                // New lines take the current price.
                                assert_eq!(Some(&l.unit_price), prices_now.get(&l.product));
                                assert!(l.quantity > 0);
                            }
                            let mut products: Vec<_> = lines.iter().map(|l| l.product).collect();
                            products.sort();
                            products.dedup();
                            assert_eq!(products.len(), lines.len(), "distinct products");
                            assert!(orders.insert(order, (Status::Pending, lines, t)).is_none());
                        }
                        Op::SetStatus { order, from, to } => {
                            let o = orders.get_mut(&order).expect("known order");
                            assert_eq!(o.0, from);
                            assert!(from.may_become(to), "{from:?} -> {to:?}");
                            o.0 = to;
                            seen_forward += 1;
                        }
                        Op::EditQuantity {
                            order,
                            product,
                            from,
                            to,
                            old_total,
                            new_total,
                        } => {
                            let o = orders.get_mut(&order).expect("known order");
                            assert_eq!(o.0, Status::Pending, "only pending orders are edited");
                            assert_eq!(o.2, old_total);
                            let line = o.1.iter_mut().find(|l| l.product == product).unwrap();
                            assert_eq!(line.quantity, from);
                            assert!(to != from && (1..=5).contains(&to));
                            line.quantity = to;
                            assert_eq!(new_total, total(&o.1));
                            o.2 = new_total;
                        }
                        Op::DeleteOrder {
                            order,
                            status,
                            lines,
                        } => {
                            let o = orders.remove(&order).expect("known order");
                            assert_eq!(o.0, status);
                            assert!(status.is_final(), "only finished orders are deleted");
                            assert_eq!(o.1.len(), lines);
                        }
                        Op::NewCustomer { .. } => {}
                    }
                }
            }
            assert!(seen_forward > 1_000);
            for (status, lines, t) in orders.values() {
                assert_eq!(*t, total(lines));
                assert!(Status::ALL.contains(status));
            }
        }
    }

    #[test]
    fn the_lifecycle_allows_only_forward_moves() {
        use Status::*;
        assert!(Pending.may_become(Paid) && Paid.may_become(Shipped));
        assert!(Shipped.may_become(Delivered));
        assert!(Pending.may_become(Cancelled) && Paid.may_become(Cancelled));
        for (from, to) in [
            (Shipped, Cancelled),
            (Delivered, Cancelled),
            (Paid, Pending),
            (Pending, Shipped),
            (Delivered, Pending),
            (Cancelled, Paid),
        ] {
            assert!(!from.may_become(to), "{from:?} -> {to:?}");
        }
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>(), Ok(s));
        }
    }

    #[test]
    fn rejected_operations_are_undone_in_the_model() {
        let mut model = Model::new(3, 1, &prices(2));
        let mut k = 0u64;
        let mut next = |model: &mut Model| {
            k += 1;
            model.step(Duration::from_millis(k * 25))
        };
        // A rejected new order is forgotten: it never changes status.
        let ops = next(&mut model);
        let Some(Op::NewOrder { order, .. }) = ops.iter().find(|o| o.kind() == OpKind::NewOrder)
        else {
            panic!("no order in {ops:?}")
        };
        let order = *order;
        model.rejected(ops.iter().find(|o| o.kind() == OpKind::NewOrder).unwrap());
        assert!(!model.knows(order));
        for _ in 0..2_000 {
            for op in next(&mut model) {
                match &op {
                    Op::SetStatus { order: o, .. }
                    | Op::EditQuantity { order: o, .. }
                    | Op::DeleteOrder { order: o, .. } => assert_ne!(*o, order),
                    Op::ChangePrice { product, from, .. } => {
                        // A rejected price change puts the old price back.
                        let product = *product;
                        let from = *from;
                        model.rejected(&op);
                        assert_eq!(model.prices[product.0 as usize], Some(from));
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn adopted_orders_finish_and_are_never_edited_or_deleted() {
        let mut model = Model::new(5, 2, &prices(3));
        let adopted: Vec<OrderRef> = [Status::Pending, Status::Paid, Status::Shipped]
            .into_iter()
            .map(|s| model.adopt(s, Duration::ZERO))
            .collect();
        let mut finished = 0;
        for k in 0..2_000u64 {
            for op in model.step(Duration::from_millis(k * 25)) {
                match op {
                    Op::SetStatus { order, to, .. } if adopted.contains(&order) => {
                        finished += usize::from(to == Status::Delivered)
                    }
                    Op::EditQuantity { order, .. } | Op::DeleteOrder { order, .. } => {
                        assert!(!adopted.contains(&order))
                    }
                    _ => {}
                }
            }
        }
        assert_eq!(finished, 3);
        assert!(adopted.iter().all(|o| !model.knows(*o)));
    }

    #[test]
    fn the_summary_line_names_every_count() {
        let mut totals = Totals::default();
        totals.count(&Op::NewOrder {
            order: OrderRef(0),
            customer: CustomerRef(0),
            lines: vec![Line {
                product: ProductRef(0),
                quantity: 2,
                unit_price: Decimal::new(150, 2),
            }],
            total: Decimal::new(300, 2),
        });
        assert!(totals.fail("paid/40001".into()));
        assert!(!totals.fail("paid/40001".into()));
        let summary = Summary {
            seed: 9,
            target: 2.0,
            elapsed: Duration::from_millis(500),
            totals,
        };
        let line = summary.to_string();
        assert!(line.starts_with("loadgen: summary: seed=9 elapsed=0.50s target=2/s achieved=2.0/s orders=1 lines=1 paid=0"), "{line}");
        assert!(
            line.ends_with("deleted=0 lines_deleted=0 failed=2 (paid/40001=2)"),
            "{line}"
        );
    }
}
