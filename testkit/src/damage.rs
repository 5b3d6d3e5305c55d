//! Random damage to a message, for the decoders' agreement tests: the
//! scanner must fail (or not) exactly as the serde path does, whatever the
//! bytes.

/// What damage inserts or writes over: the bytes JSON's structure turns on,
/// and some that are not UTF-8.
const NOISE: &[u8] = b"\"\\{}[],:0123456789-+.eEntfu \x01\xff\xc3";

/// `bytes` with one or two bytes removed, inserted or overwritten.
pub fn damaged(bytes: &[u8], rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut damaged = bytes.to_vec();
    for _ in 0..rng.usize(1..3) {
        let at = rng.usize(0..damaged.len());
        match rng.u8(0..3) {
            0 => {
                damaged.remove(at);
            }
            1 => damaged.insert(at, NOISE[rng.usize(0..NOISE.len())]),
            _ => damaged[at] = NOISE[rng.usize(0..NOISE.len())],
        }
    }
    damaged
}
