#!/usr/bin/env python3
"""Deterministic online-store workload: prints SQL for `psql -v ON_ERROR_STOP=1`.

  python3 tests/workload/store_workload.py --seed 1 --size small | psql -v ON_ERROR_STOP=1
  python3 tests/workload/store_workload.py --seed 7 --orders 400 --expect expect.json | psql ...

One autocommitted statement, or one small BEGIN ... COMMIT transaction, per line.
The same seed and size always print the same SQL (stdlib `random.Random(seed)`).

What it does: new customers and products, orders with items (an order's
total_amount is always the sum of quantity * unit_price of its items), status
changes through the lifecycle pending -> paid -> shipped -> delivered,
cancellations, product price / name / category changes, item quantity and
unit-price edits, item deletes, order deletes (ON DELETE CASCADE removes the
items), and deletes of customers / products that nothing references.

It only touches rows it created itself, with explicit ids from
1000 + seed * 100000 upwards (far above the seed data's bigserial ids, and
disjoint between seeds), so several runs with different seeds can share a
database. Emails and product names carry the seed too (they are unique).

created_at values are fixed instants spread over ~3 hours of one day
(2024-03-01 + seed % 20 days); most have whole seconds, about a quarter have
fractional seconds, including ones just before a minute boundary.

--expect FILE writes what the workload does, as JSON: per table the number of
inserts (c), updates (u), deletes (d) and the number of Kafka messages the
connector produces for them (c + u + 2 * d: a delete is followed by a
tombstone), plus the final row counts of the workload's own rows.
"""
import argparse
import datetime as dt
import json
import random
import sys
from decimal import Decimal

SIZES = {"small": 45, "large": 450}  # orders; ~6.7 statements per order

STATUS_NEXT = {"pending": "paid", "paid": "shipped", "shipped": "delivered"}
CATEGORIES = ["coffee", "tea", "equipment", "supplies", "accessories"]
FIRST = ["Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "John", "Margaret", "Ken",
         "Radia", "Niklaus", "Shafi", "Tony", "Leslie", "Sophie"]
LAST = ["Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov", "Knuth", "Allen", "Backus", "Hamilton",
        "Thompson", "Perlman", "Wirth", "Goldwasser", "Hoare", "Lamport", "Wilson"]
GOODS = ["beans", "kettle", "filters", "grinder", "mug", "scale", "dripper", "tamper", "jar", "brush"]


def q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


class Workload:
    def __init__(self, seed: int, orders: int):
        self.rng = random.Random(seed)
        self.seed = seed
        self.target_orders = orders
        self.base_id = 1000 + seed * 100000
        self.next_id = {t: self.base_id for t in ("customers", "products", "orders", "order_items")}
        self.day = dt.datetime(2024, 3, 1, 8, 0, 0, tzinfo=dt.timezone.utc) + dt.timedelta(days=seed % 20)
        # updated_at values move forward from the end of the created_at window.
        self.clock = self.day + dt.timedelta(hours=3)
        # Model of the workload's own rows, mirrored exactly so every statement is valid.
        self.customers = {}  # id -> number of orders referencing it
        self.products = {}   # id -> {"price": Decimal, "refs": int}
        self.orders = {}     # id -> {"customer": id, "status": str, "items": {item_id: [product, qty, price]}}
        self.ops = {t: {"c": 0, "u": 0, "d": 0} for t in self.next_id}
        self.lines = []

    # -- building blocks -------------------------------------------------------
    def new_id(self, table):
        self.next_id[table] += 1
        return self.next_id[table] - 1

    def created_at(self) -> str:
        """An instant within ~3 hours of the workload's day."""
        t = self.day + dt.timedelta(seconds=self.rng.randrange(3 * 3600))
        r = self.rng.random()
        if r < 0.05:
            t = t.replace(second=59, microsecond=999999)  # last microsecond of a minute
        elif r < 0.25:
            t = t.replace(microsecond=self.rng.randrange(1, 1000000))
        return t.isoformat(sep=" ")

    def updated_at(self) -> str:
        self.clock += dt.timedelta(seconds=self.rng.randrange(1, 20))
        return self.clock.isoformat(sep=" ")

    def price(self) -> Decimal:
        return (Decimal(self.rng.randrange(100, 20000)) / 100).quantize(Decimal("0.01"))

    def emit(self, *statements):
        if len(statements) == 1:
            self.lines.append(statements[0] + ";")
        else:
            self.lines.append("BEGIN; " + " ".join(s + ";" for s in statements) + " COMMIT;")

    @staticmethod
    def total(order) -> Decimal:
        return sum((qty * price for _, qty, price in order["items"].values()), Decimal("0.00"))

    def orders_in(self, *statuses):
        return [o for o, v in self.orders.items() if v["status"] in statuses]

    # -- operations ------------------------------------------------------------
    def new_customer(self):
        cid = self.new_id("customers")
        name = f"{self.rng.choice(FIRST)} {self.rng.choice(LAST)}"
        self.emit(f"INSERT INTO customers (id, email, full_name, created_at) VALUES "
                  f"({cid}, {q(f'c{cid}.s{self.seed}@example.test')}, {q(name)}, {q(self.created_at())})")
        self.customers[cid] = 0
        self.ops["customers"]["c"] += 1

    def new_product(self):
        pid = self.new_id("products")
        price = self.price()
        name = f"{self.rng.choice(GOODS).capitalize()} #{pid}-s{self.seed}"
        self.emit(f"INSERT INTO products (id, name, category, price) VALUES "
                  f"({pid}, {q(name)}, {q(self.rng.choice(CATEGORIES))}, {price})")
        self.products[pid] = {"price": price, "refs": 0}
        self.ops["products"]["c"] += 1

    def new_order(self):
        oid = self.new_id("orders")
        cid = self.rng.choice(sorted(self.customers))
        items = {}
        for pid in self.rng.sample(sorted(self.products), self.rng.randint(1, min(4, len(self.products)))):
            items[self.new_id("order_items")] = [pid, self.rng.randint(1, 5), self.products[pid]["price"]]
        order = {"customer": cid, "status": "pending", "items": items}
        created = self.created_at()
        values = ", ".join(f"({iid}, {oid}, {pid}, {qty}, {price})" for iid, (pid, qty, price) in items.items())
        self.emit(f"INSERT INTO orders (id, customer_id, status, total_amount, created_at, updated_at) VALUES "
                  f"({oid}, {cid}, 'pending', {self.total(order)}, {q(created)}, {q(created)})",
                  f"INSERT INTO order_items (id, order_id, product_id, quantity, unit_price) VALUES {values}")
        self.orders[oid] = order
        self.customers[cid] += 1
        for pid, _, _ in items.values():
            self.products[pid]["refs"] += 1
        self.ops["orders"]["c"] += 1
        self.ops["order_items"]["c"] += len(items)

    def advance_status(self):
        candidates = self.orders_in("pending", "paid", "shipped")
        if not candidates:
            return False
        oid = self.rng.choice(candidates)
        order = self.orders[oid]
        order["status"] = STATUS_NEXT[order["status"]]
        self.emit(f"UPDATE orders SET status = {q(order['status'])}, updated_at = {q(self.updated_at())} "
                  f"WHERE id = {oid}")
        self.ops["orders"]["u"] += 1
        return True

    def cancel(self):
        candidates = self.orders_in("pending", "paid")
        if not candidates:
            return False
        oid = self.rng.choice(candidates)
        self.orders[oid]["status"] = "cancelled"
        self.emit(f"UPDATE orders SET status = 'cancelled', updated_at = {q(self.updated_at())} WHERE id = {oid}")
        self.ops["orders"]["u"] += 1
        return True

    def change_price(self):
        pid = self.rng.choice(sorted(self.products))
        self.products[pid]["price"] = self.price()
        self.emit(f"UPDATE products SET price = {self.products[pid]['price']} WHERE id = {pid}")
        self.ops["products"]["u"] += 1
        return True

    def rename_product(self):
        pid = self.rng.choice(sorted(self.products))
        if self.rng.random() < 0.5:
            self.emit(f"UPDATE products SET category = {q(self.rng.choice(CATEGORIES))} WHERE id = {pid}")
        else:
            self.emit(f"UPDATE products SET name = name || ' v2' WHERE id = {pid}")
        self.ops["products"]["u"] += 1
        return True

    def edit_item(self):
        # Only pending orders change their items; the order total follows.
        candidates = [o for o in self.orders_in("pending") if self.orders[o]["items"]]
        if not candidates:
            return False
        oid = self.rng.choice(candidates)
        order = self.orders[oid]
        iid = self.rng.choice(sorted(order["items"]))
        item = order["items"][iid]
        if self.rng.random() < 0.8:
            item[1] = self.rng.choice([n for n in range(1, 8) if n != item[1]])
            change = f"quantity = {item[1]}"
        else:
            item[2] = (item[2] * Decimal("0.9")).quantize(Decimal("0.01"))  # a 10 % discount
            change = f"unit_price = {item[2]}"
        self.emit(f"UPDATE order_items SET {change} WHERE id = {iid}",
                  f"UPDATE orders SET total_amount = {self.total(order)}, updated_at = {q(self.updated_at())} "
                  f"WHERE id = {oid}")
        self.ops["order_items"]["u"] += 1
        self.ops["orders"]["u"] += 1
        return True

    def delete_item(self):
        candidates = [o for o in self.orders_in("pending") if len(self.orders[o]["items"]) >= 2]
        if not candidates:
            return False
        oid = self.rng.choice(candidates)
        order = self.orders[oid]
        iid = self.rng.choice(sorted(order["items"]))
        pid = order["items"].pop(iid)[0]
        self.products[pid]["refs"] -= 1
        self.emit(f"DELETE FROM order_items WHERE id = {iid}",
                  f"UPDATE orders SET total_amount = {self.total(order)}, updated_at = {q(self.updated_at())} "
                  f"WHERE id = {oid}")
        self.ops["order_items"]["d"] += 1
        self.ops["orders"]["u"] += 1
        return True

    def delete_order(self):
        if len(self.orders) < 5:
            return False
        oid = self.rng.choice(sorted(self.orders))
        order = self.orders.pop(oid)
        self.customers[order["customer"]] -= 1
        for pid, _, _ in order["items"].values():
            self.products[pid]["refs"] -= 1
        self.emit(f"DELETE FROM orders WHERE id = {oid}")  # the items go with it (ON DELETE CASCADE)
        self.ops["orders"]["d"] += 1
        self.ops["order_items"]["d"] += len(order["items"])
        return True

    def rename_customer(self):
        cid = self.rng.choice(sorted(self.customers))
        self.emit(f"UPDATE customers SET full_name = {q(f'{self.rng.choice(FIRST)} {self.rng.choice(LAST)}')} "
                  f"WHERE id = {cid}")
        self.ops["customers"]["u"] += 1
        return True

    def delete_customer(self):
        candidates = [c for c, refs in self.customers.items() if refs == 0]
        if len(self.customers) < 3 or not candidates:
            return False
        cid = self.rng.choice(sorted(candidates))
        del self.customers[cid]
        self.emit(f"DELETE FROM customers WHERE id = {cid}")
        self.ops["customers"]["d"] += 1
        return True

    def delete_product(self):
        candidates = [p for p, v in self.products.items() if v["refs"] == 0]
        if len(self.products) < 4 or not candidates:
            return False
        pid = self.rng.choice(sorted(candidates))
        del self.products[pid]
        self.emit(f"DELETE FROM products WHERE id = {pid}")
        self.ops["products"]["d"] += 1
        return True

    # -- the run ---------------------------------------------------------------
    def generate(self):
        self.lines.append(f"-- store_workload.py --seed {self.seed} --orders {self.target_orders}")
        for _ in range(3):
            self.new_customer()
        for _ in range(5):
            self.new_product()
        mutations = [  # (operation, weight)
            (self.advance_status, 6), (self.cancel, 1), (self.change_price, 1.5), (self.rename_product, 0.5),
            (self.edit_item, 4), (self.delete_item, 1.5), (self.delete_order, 0.5), (self.rename_customer, 0.7),
            (self.delete_customer, 0.3), (self.delete_product, 0.3),
        ]
        ops, weights = zip(*mutations)
        for _ in range(self.target_orders):
            if self.rng.random() < 0.35:
                self.new_customer()
            if self.rng.random() < 0.15:
                self.new_product()
            self.new_order()
            for _ in range(self.rng.randint(4, 7)):
                for _attempt in range(5):  # some operations need a suitable row; pick again then
                    if self.rng.choices(ops, weights)[0]():
                        break
        return self.lines

    def expectation(self):
        tables = {}
        for t, o in self.ops.items():
            tables[t] = {**o, "messages": o["c"] + o["u"] + 2 * o["d"]}
        rows = {"customers": len(self.customers), "products": len(self.products), "orders": len(self.orders),
                "order_items": sum(len(o["items"]) for o in self.orders.values())}
        return {"seed": self.seed, "orders": self.target_orders,
                "statements": sum(1 for line in self.lines if not line.startswith("--")),
                "messages": sum(v["messages"] for v in tables.values()), "tables": tables, "final_rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--orders", type=int, help="number of orders to create")
    size.add_argument("--size", choices=sorted(SIZES), help="small: ~300 statements, large: ~3000")
    ap.add_argument("--expect", metavar="FILE", help="write the expected event counts as JSON")
    args = ap.parse_args()
    if args.seed < 0:
        ap.error("--seed must be >= 0")
    orders = args.orders if args.orders is not None else SIZES[args.size or "small"]

    w = Workload(args.seed, orders)
    sys.stdout.write("\n".join(w.generate()) + "\n")
    if args.expect:
        with open(args.expect, "w") as f:
            json.dump(w.expectation(), f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
