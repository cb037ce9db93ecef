//! The raw NATS ceiling: what one nats-server carries between two connections on this machine
//! with no crypto, no hashing and no disk, for the same bytes in messages of the same size as a
//! v2 transfer. `scripts/bench.sh` runs it beside `catalog download` against the same server,
//! so the download's ratio to it says what the data path costs above NATS itself.
//!
//! Flow control like a v2 read's: the publisher keeps at most WINDOW messages not yet seen by
//! the subscriber (the subscriber acknowledges every WINDOW/4 messages on a second subject), so
//! nothing is dropped as a slow consumer and the figure is a sustained rate. Each message
//! carries one header, as a chunk does (its index).
//!
//! Usage: `raw_nats_ceiling URL BYTES MESSAGE_BYTES [WINDOW=64]`
//! Prints one human-readable line and `RESULT bytes=.. message_bytes=.. window=.. secs=.. mbps=..`.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use futures::StreamExt;

#[path = "common/outcome.rs"]
mod outcome;

#[tokio::main]
async fn main() -> ExitCode {
    outcome::exit_code("raw_nats_ceiling", run().await)
}

async fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 || args.len() > 4 {
        eprintln!("usage: raw_nats_ceiling URL BYTES MESSAGE_BYTES [WINDOW=64]");
        std::process::exit(2)
    }
    let url = &args[0];
    let total: u64 = args[1].parse().context("BYTES must be a number")?;
    let size: usize = args[2].parse().context("MESSAGE_BYTES must be a number")?;
    let window: u64 = args.get(3).map(|s| s.parse()).transpose().context("WINDOW must be a number")?.unwrap_or(64);
    if total == 0 || size == 0 || window < 4 {
        bail!("BYTES and MESSAGE_BYTES must be at least 1, WINDOW at least 4");
    }
    let messages = total.div_ceil(size as u64);
    let token = format!("{:016x}", rand::random::<u64>());
    let data_subject = format!("bench.ceiling.{token}.data");
    let ack_subject = format!("bench.ceiling.{token}.ack");

    let publisher = async_nats::connect(url).await.with_context(|| format!("cannot connect to {url}"))?;
    let subscriber = async_nats::connect(url).await.with_context(|| format!("cannot connect to {url}"))?;
    let mut data = subscriber.subscribe(data_subject.clone()).await?;
    let mut acks = publisher.subscribe(ack_subject.clone()).await?;
    subscriber.flush().await?;
    publisher.flush().await?;

    let seen = Arc::new(AtomicU64::new(0));
    let every = window / 4;
    let receiver = {
        let seen = seen.clone();
        let subscriber = subscriber.clone();
        tokio::spawn(async move {
            let mut got = 0u64;
            let mut bytes = 0u64;
            while got < messages {
                let Some(msg) = data.next().await else { break };
                bytes += msg.payload.len() as u64;
                got += 1;
                if got.is_multiple_of(every) || got == messages {
                    seen.store(got, Ordering::Release);
                    let _ = subscriber.publish(ack_subject.clone(), Bytes::from(got.to_be_bytes().to_vec())).await;
                }
            }
            bytes
        })
    };

    // One buffer shared by every message (Bytes clones are reference counts), as the server's
    // sealed chunk is handed to the client without a copy.
    let body = Bytes::from(vec![0x5au8; size]);
    let started = Instant::now();
    let mut acked = 0u64;
    for i in 0..messages {
        while i - acked >= window {
            let msg = tokio::time::timeout(Duration::from_secs(10), acks.next())
                .await
                .context("no acknowledgement within 10 s")?
                .context("ack subscription ended")?;
            if let Ok(n) = <[u8; 8]>::try_from(&msg.payload[..]) {
                acked = acked.max(u64::from_be_bytes(n));
            }
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("x-natster-chunk-idx", i.to_string().as_str());
        let len = if i + 1 == messages { (total - i * size as u64) as usize } else { size };
        publisher.publish_with_headers(data_subject.clone(), headers, body.slice(..len)).await?;
    }
    publisher.flush().await?;
    let received = tokio::time::timeout(Duration::from_secs(60), receiver)
        .await
        .context("the subscriber did not receive everything within 60 s")??;
    let secs = started.elapsed().as_secs_f64();
    if received != total {
        bail!("received {received} bytes of {total}");
    }
    let mbps = total as f64 / secs / 1e6;
    println!(
        "raw NATS: {total} bytes in {messages} messages of {size} bytes (window {window}) in {secs:.3} s: {mbps:.1} MB/s"
    );
    println!("RESULT bytes={total} message_bytes={size} window={window} secs={secs:.4} mbps={mbps:.1}");
    Ok(())
}
