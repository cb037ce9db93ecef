//! The NATS floor of one small random read: what a v2 leaf read costs on this machine when
//! nothing but NATS does work. A "reader" connection sends a request; a "server" connection
//! answers it with an acknowledgement and publishes one record of RECORD bytes (a 16 KiB leaf
//! with its proof, nonce and tag is about 16.7 KB) on a second subject, as a catalog server
//! does for a read of several records; the reader's latency is from sending to having the record. No crypto, no disk, no
//! FUSE: natster's own random-read latency minus this is what natster adds above NATS. It also
//! times the same record sent as the reply itself (one message back, not two): the floor of
//! an inline read, which is how the mount asks for a random read's leaf.
//!
//! Usage: `nats_read_floor URL COUNT [RECORD=16700]`
//! Prints a human-readable line per shape and `RESULT n=.. record=.. p50_ms=.. p99_ms=.. reply_p50_ms=.. reply_p99_ms=..`.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use futures::StreamExt;

#[path = "common/latency.rs"]
mod latency;
use latency::{ms, Summary};

#[path = "common/outcome.rs"]
mod outcome;

#[tokio::main]
async fn main() -> ExitCode {
    outcome::exit_code("nats_read_floor", run().await)
}

async fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 3 {
        eprintln!("usage: nats_read_floor URL COUNT [RECORD=16700]");
        std::process::exit(2)
    }
    let url = &args[0];
    let count: usize = args[1].parse().context("COUNT must be a number")?;
    let record: usize =
        args.get(2).map(|s| s.parse()).transpose().context("RECORD must be a number")?.unwrap_or(16_700);
    if count == 0 || record == 0 {
        bail!("COUNT and RECORD must be at least 1");
    }
    let token = format!("{:016x}", rand::random::<u64>());
    let read_subject = format!("bench.floor.{token}.read");
    let inline_subject = format!("bench.floor.{token}.inline");
    let media_subject = format!("bench.floor.{token}.media");

    let server = async_nats::connect(url).await.with_context(|| format!("cannot connect to {url}"))?;
    let reader = async_nats::connect(url).await.with_context(|| format!("cannot connect to {url}"))?;
    let mut requests = server.subscribe(read_subject.clone()).await?;
    let mut inline_requests = server.subscribe(inline_subject.clone()).await?;
    let mut media = reader.subscribe(media_subject.clone()).await?;
    server.flush().await?;
    reader.flush().await?;

    let body = Bytes::from(vec![0x5au8; record]);
    let answering = {
        let (server, media_subject, body) = (server.clone(), media_subject.clone(), body.clone());
        tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                if let Some(reply) = request.reply {
                    let _ = server.publish(reply, Bytes::from_static(b"{\"ok\":true}")).await;
                }
                let _ = server.publish(media_subject.clone(), body.clone()).await;
            }
        })
    };
    let answering_inline = {
        let (server, body) = (server.clone(), body.clone());
        tokio::spawn(async move {
            while let Some(request) = inline_requests.next().await {
                if let Some(reply) = request.reply {
                    let _ = server.publish(reply, body.clone()).await;
                }
            }
        })
    };

    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let ack = reader.request(read_subject.clone(), Bytes::from_static(b"{}"));
        let (ack, got) = tokio::join!(ack, media.next());
        ack.context("no acknowledgement")?;
        let got = got.context("the media subscription ended")?;
        if got.payload.len() != record {
            bail!("a record of {} bytes arrived, not {record}", got.payload.len());
        }
        samples.push(started.elapsed());
    }
    let mut inline = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let got = reader.request(inline_subject.clone(), Bytes::from_static(b"{}")).await.context("no reply")?;
        if got.payload.len() != record {
            bail!("a reply of {} bytes arrived, not {record}", got.payload.len());
        }
        inline.push(started.elapsed());
    }
    answering.abort();
    answering_inline.abort();
    let summary = Summary::of(&mut samples).context("no samples")?;
    let reply = Summary::of(&mut inline).context("no samples")?;
    for (shape, s) in [("request + ack + record", &summary), ("request + record as the reply", &reply)] {
        println!(
            "{count} {shape} ({record} bytes) round trips through {url}: p50 {:.3} ms, p99 {:.3} ms, mean {:.3} ms",
            ms(s.p50),
            ms(s.p99),
            ms(s.mean)
        );
    }
    println!(
        "RESULT n={count} record={record} {} reply_p50_ms={:.3} reply_p99_ms={:.3}",
        summary.result_fields(),
        ms(reply.p50),
        ms(reply.p99)
    );
    Ok(())
}
