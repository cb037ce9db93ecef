//! What the v2 data path's per-byte work costs on this machine, one core: sealing and opening
//! a chunk with the session cipher (XChaCha20-Poly1305, `chacha20poly1305`), hashing its
//! 16 KiB chunk tree leaves (BLAKE3, done once by the server as it reads and once by the reader
//! to check the proof), and one memcpy for scale. Each figure is the median of 5 passes over
//! 256 MiB in chunks of CHUNK bytes.
//!
//! Usage: `aead_cost [CHUNK=262144]`
//! Prints one line per step and `RESULT chunk=.. seal_mbps=.. open_mbps=.. leaves_mbps=.. copy_mbps=..`.

use std::time::Instant;

use bytes::Bytes;
use natster_mount::chunk_tree;
use natster_mount::crypto::{EphemeralKey, SessionBinding, NONCE_LEN};

const TOTAL: usize = 256 << 20;

fn median_mbps(mut pass: impl FnMut()) -> f64 {
    let mut rates: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            pass();
            TOTAL as f64 / t.elapsed().as_secs_f64() / 1e6
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[2]
}

fn main() {
    let chunk: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(256 * 1024);
    let n = TOTAL / chunk;
    let (a, b) = (EphemeralKey::generate(), EphemeralKey::generate());
    let binding = SessionBinding {
        session: "00112233445566778899aabbccddeeff",
        catalog: "c",
        hash: "h",
        client_xkey: a.public_xkey(),
        server_xkey: b.public_xkey(),
    };
    let (Ok(server), Ok(client)) = (b.agree(a.public_xkey(), &binding), a.agree(b.public_xkey(), &binding)) else {
        eprintln!("aead_cost: key agreement failed");
        std::process::exit(1)
    };
    let plain = vec![0x5au8; chunk];
    let mut sealed: Vec<Bytes> = Vec::with_capacity(n);

    let seal = median_mbps(|| {
        sealed.clear();
        for i in 0..n as u64 {
            let mut buf = Vec::with_capacity(NONCE_LEN + chunk + 16);
            buf.resize(NONCE_LEN, 0);
            buf.extend_from_slice(&plain);
            server.seal_in_place(i, &mut buf);
            sealed.push(Bytes::from(buf));
        }
    });
    let open = median_mbps(|| {
        for (i, s) in sealed.iter().enumerate() {
            // A clone is shared, so this includes the one copy a reader makes of a NATS buffer.
            if client.open_in_place(i as u64, s.clone()).is_err() {
                eprintln!("aead_cost: chunk {i} did not open");
                std::process::exit(1)
            }
        }
    });
    let mut sink = 0u8;
    let leaves = median_mbps(|| {
        for _ in 0..n {
            for leaf in plain.chunks(chunk_tree::LEAF_SIZE) {
                sink ^= chunk_tree::leaf_hash(leaf)[0];
            }
        }
    });
    let mut dst = vec![0u8; chunk];
    let copy = median_mbps(|| {
        for _ in 0..n {
            dst.copy_from_slice(std::hint::black_box(&plain));
            sink ^= dst[chunk / 2];
        }
    });
    std::hint::black_box(sink);
    let per_mib = |mbps: f64| 1048576.0 / (mbps * 1e6) * 1e3;
    println!("chunk {chunk} bytes, one core:");
    println!("  seal (XChaCha20-Poly1305)  {seal:8.0} MB/s  {:.3} ms/MiB", per_mib(seal));
    println!("  open (copy + decrypt)      {open:8.0} MB/s  {:.3} ms/MiB", per_mib(open));
    println!("  BLAKE3 16 KiB leaves       {leaves:8.0} MB/s  {:.3} ms/MiB", per_mib(leaves));
    println!("  memcpy                     {copy:8.0} MB/s  {:.3} ms/MiB", per_mib(copy));
    println!(
        "RESULT chunk={chunk} seal_mbps={seal:.0} open_mbps={open:.0} leaves_mbps={leaves:.0} copy_mbps={copy:.0}"
    );
}
