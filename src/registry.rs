//! The one list of the aggregates the processor keeps.
//!
//! Adding an aggregate means adding a line to the list below, plus the
//! aggregate itself (`aggregate`), its ClickHouse table (`SinkTable` and
//! init/clickhouse) and its GROUP BY over Postgres (`reconcile`). The
//! pipeline, replay, rebuild and reconcile all go through the list.
//! Each source table feeds exactly one aggregate.

use std::future::Future;
use std::pin::Pin;

use crate::aggregate::{
    Aggregate, AggregateState, Applied, CustomersByMinute, OrdersByMinute, ProductSales, Products,
    Unplaceable,
};
use crate::cdc::{Origin, SnapshotId, Table, TableChange};
use crate::sink::SinkTable;

/// Something done once for each aggregate type.
pub trait EachAggregate {
    fn visit<A: SinkTable>(&mut self);
}

/// Futures of one kind, one per aggregate (pushed by an [`EachAggregate`]
/// or [`EachState`] visitor), awaited in the list's order.
pub struct InTurn<'a, T>(pub Vec<Pin<Box<dyn Future<Output = anyhow::Result<T>> + 'a>>>);

impl<T> InTurn<'_, T> {
    pub async fn all(self) -> anyhow::Result<Vec<T>> {
        let mut done = Vec::with_capacity(self.0.len());
        for future in self.0 {
            done.push(future.await?);
        }
        Ok(done)
    }
}

/// Something done once for each aggregate's state in an [`AllAggregates`].
pub trait EachState<'a> {
    fn visit<A: SinkTable>(&mut self, state: &'a AggregateState<A>);
}

macro_rules! aggregates {
    ($($field:ident: $kind:ty),+ $(,)?) => {
        /// Calls `visitor` for every aggregate, in the list's order.
        pub fn each_aggregate(visitor: &mut impl EachAggregate) {
            $(visitor.visit::<$kind>();)+
        }

        /// The state of every aggregate, fed from one stream of events.
        #[derive(Default)]
        pub struct AllAggregates {
            $(pub $field: AggregateState<$kind>,)+
        }

        impl AllAggregates {
            /// Every aggregate counting a whole log again, from its newest
            /// snapshot ([`AggregateState::rebuilding`]).
            pub fn rebuilding() -> Self {
                AllAggregates {
                    $($field: AggregateState::rebuilding(),)+
                }
            }

            /// Calls `visitor` with every aggregate's state, in the list's order.
            pub fn each_state<'a>(&'a self, visitor: &mut impl EachState<'a>) {
                $(visitor.visit(&self.$field);)+
            }

            /// The newest snapshot any table's rows start from.
            pub fn newest_snapshot(&self) -> SnapshotId {
                [$(self.$field.latest_snapshot()),+]
                    .into_iter()
                    .max()
                    .unwrap_or_default()
            }

            /// Whether every partition of every aggregate reached the newest
            /// snapshot ([`AggregateState::rebuilt`]). One snapshot covers
            /// every table, so a table whose rows start from an older one had
            /// no rows at all in the newest: its rows are what the snapshot
            /// replaced.
            pub fn rebuilt(&self) -> Result<(), Unplaceable> {
                let newest = self.newest_snapshot().lsn;
                $(self.$field.rebuilt(newest)?;)+
                Ok(())
            }

            /// Applies a change to the aggregate its table feeds.
            pub fn apply(
                &mut self,
                partition: i32,
                offset: i64,
                origin: Origin,
                change: &TableChange,
            ) -> Result<Applied, Unplaceable> {
                let table = change.table();
                $(
                    if table == <$kind as Aggregate>::SOURCE {
                        return self.$field.apply(partition, offset, origin, change);
                    }
                )+
                unreachable!("every source table feeds an aggregate (checked by a test)")
            }
        }
    };
}

aggregates! {
    orders_by_minute: OrdersByMinute,
    product_sales: ProductSales,
    customers_by_minute: CustomersByMinute,
    products: Products,
}

/// Every aggregate as (its source table, its name: its ClickHouse table),
/// in the list's order.
pub fn sources() -> Vec<(Table, &'static str)> {
    struct Sources(Vec<(Table, &'static str)>);
    impl EachAggregate for Sources {
        fn visit<A: SinkTable>(&mut self) {
            self.0.push((A::SOURCE, A::NAME));
        }
    }
    let mut sources = Sources(Vec::new());
    each_aggregate(&mut sources);
    sources.0
}

/// Every aggregate's name (its ClickHouse table), in the list's order.
pub fn names() -> Vec<&'static str> {
    sources().into_iter().map(|(_, name)| name).collect()
}

/// The aggregate a source table feeds: its ClickHouse table.
pub fn aggregate_of(table: Table) -> &'static str {
    sources()
        .into_iter()
        .find_map(|(source, name)| (source == table).then_some(name))
        .expect("every source table feeds an aggregate (checked by a test)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_table_feeds_exactly_one_aggregate() {
        let sources = sources();
        let mut tables: Vec<Table> = sources.iter().map(|(t, _)| *t).collect();
        tables.sort_by_key(|t| t.name());
        let mut all = Table::ALL.to_vec();
        all.sort_by_key(|t| t.name());
        assert_eq!(tables, all);
        assert_eq!(
            sources,
            [
                (Table::Orders, "orders_by_minute"),
                (Table::OrderItems, "product_sales"),
                (Table::Customers, "customers_by_minute"),
                (Table::Products, "products"),
            ]
        );
        assert_eq!(aggregate_of(Table::OrderItems), "product_sales");
        let listed: Vec<&str> = sources.iter().map(|(_, name)| *name).collect();
        assert_eq!(names(), listed);
    }
}
