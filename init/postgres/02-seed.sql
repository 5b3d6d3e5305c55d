-- A little seed data so a fresh stack has something to show.
INSERT INTO customers (email, full_name, created_at) VALUES
    ('ada@example.com',   'Ada Lovelace',   '2024-01-02 10:00:00+00'),
    ('alan@example.com',  'Alan Turing',    '2024-01-02 10:00:30+00'),
    ('grace@example.com', 'Grace Hopper',   '2024-01-03 08:15:00+00');

INSERT INTO products (name, category, price) VALUES
    ('Espresso beans 1kg', 'coffee',    19.99),
    ('Pour-over kettle',   'equipment', 45.00),
    ('Paper filters x100', 'supplies',   4.49),
    ('Hand grinder',       'equipment', 89.90);

INSERT INTO orders (customer_id, status, total_amount, created_at, updated_at) VALUES
    (1, 'delivered', 39.98, '2024-02-01 09:00:10+00', '2024-02-03 12:00:00+00'),
    (2, 'pending',   49.49, '2024-02-01 09:00:40+00', '2024-02-01 09:00:40+00');

INSERT INTO order_items (order_id, product_id, quantity, unit_price) VALUES
    (1, 1, 2, 19.99),
    (2, 2, 1, 45.00),
    (2, 3, 1,  4.49);
