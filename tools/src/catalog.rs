//! The store's vocabulary, shared by the load generator (rows written to
//! Postgres) and the synthetic producer (Debezium messages written straight
//! to Kafka), so that both describe the same shop: the order lifecycle,
//! customers' names, the goods, order lines' quantities.

use std::str::FromStr;

/// An order's status, as the `orders.status` column holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Pending,
    Paid,
    Shipped,
    Delivered,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Pending,
        Status::Paid,
        Status::Shipped,
        Status::Delivered,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Paid => "paid",
            Status::Shipped => "shipped",
            Status::Delivered => "delivered",
            Status::Cancelled => "cancelled",
        }
    }

    /// The next status of the normal lifecycle.
    pub fn successor(self) -> Option<Status> {
        match self {
            Status::Pending => Some(Status::Paid),
            Status::Paid => Some(Status::Shipped),
            Status::Shipped => Some(Status::Delivered),
            Status::Delivered | Status::Cancelled => None,
        }
    }

    /// Whether an order may move from `self` to `next`: one step forward
    /// along the lifecycle, or to cancelled from pending or paid.
    pub fn may_become(self, next: Status) -> bool {
        self.successor() == Some(next)
            || (next == Status::Cancelled && matches!(self, Status::Pending | Status::Paid))
    }

    pub fn is_final(self) -> bool {
        self.successor().is_none()
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown order status {s:?}"))
    }
}

/// Customers' first and last names.
pub const FIRST_NAMES: &[&str] = &[
    "Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "John", "Margaret", "Ken",
    "Radia", "Niklaus", "Shafi", "Tony", "Leslie", "Sophie", "Annie", "Dennis", "Hedy", "Claude",
];
pub const LAST_NAMES: &[&str] = &[
    "Lovelace",
    "Turing",
    "Hopper",
    "Dijkstra",
    "Liskov",
    "Knuth",
    "Allen",
    "Backus",
    "Hamilton",
    "Thompson",
    "Perlman",
    "Wirth",
    "Goldwasser",
    "Hoare",
    "Lamport",
    "Wilson",
    "Easley",
    "Ritchie",
    "Lamarr",
    "Shannon",
];
/// Products: (name, category); a variant is appended to the name.
pub const GOODS: &[(&str, &str)] = &[
    ("Espresso beans", "coffee"),
    ("Filter roast", "coffee"),
    ("Decaf beans", "coffee"),
    ("Cold brew pack", "coffee"),
    ("Sencha", "tea"),
    ("Earl grey", "tea"),
    ("Rooibos", "tea"),
    ("Matcha", "tea"),
    ("Pour-over kettle", "equipment"),
    ("Hand grinder", "equipment"),
    ("Burr grinder", "equipment"),
    ("Dripper", "equipment"),
    ("Scale", "equipment"),
    ("Paper filters", "supplies"),
    ("Descaler", "supplies"),
    ("Cleaning tablets", "supplies"),
    ("Mug", "accessories"),
    ("Tamper", "accessories"),
    ("Storage jar", "accessories"),
    ("Brush", "accessories"),
];
pub const VARIANTS: &[&str] = &[
    "250g", "500g", "1kg", "small", "large", "classic", "pro", "travel",
];
/// Quantities of order lines: mostly one or two.
pub const QUANTITIES: &[i32] = &[1, 1, 1, 1, 2, 2, 2, 3, 4, 5];
