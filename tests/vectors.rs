//! v1 wire compatibility against a fixed, committed vector of an original Natster `download`
//! exchange (tests/vectors/v1_download.json): request and reply JSON as the original's Go
//! structs serialise, chunk headers by their literal names, 4096-byte chunks, sealed chunks
//! for fixed xkey seeds. Checked three ways: the vector opens with our crypto and parses with
//! our protocol types (and our reply serialises to the same bytes); our client downloads from
//! a fake original peer that answers with the vector's bytes and headers; and our server's
//! reply and chunks for the vector's file have the vector's shape and literal header names.
//! Nothing here takes a name from the crate's own constants, so a wrong name is caught.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use natster_mount::protocol::{self, DownloadRequest, DownloadResponse, Envelope};
use serde_json::Value;

/// The header names an original Natster client reads, literally (internal/catalogserver).
const LITERAL_HEADERS: [&str; 3] = ["x-natster-chunk-idx", "x-natster-sender-xkey", "x-natster-total-chunks"];
const CHUNK_WAIT: Duration = Duration::from_secs(10);

fn vector() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/v1_download.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("vector file")).expect("vector JSON")
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("vector has no string {key}"))
}

fn file_bytes(v: &Value) -> Vec<u8> {
    hex::decode(s(&v["file"], "hex")).expect("file hex")
}

#[test]
fn the_vector_opens_and_parses_with_our_code() {
    let v = vector();
    let file = file_bytes(&v);
    assert_eq!(sha256_hex(&file), s(&v["file"], "sha256"));
    let sender = nkeys::XKey::from_seed(s(&v, "sender_seed")).expect("sender seed");
    let target = nkeys::XKey::from_seed(s(&v, "target_seed")).expect("target seed");

    // The request parses as our DownloadRequest; the reply is byte for byte what our
    // envelope writes for the same DownloadResponse.
    let req: DownloadRequest = serde_json::from_str(s(&v, "request_json")).expect("request parses");
    assert_eq!(req.hash, s(&v["file"], "sha256"));
    assert_eq!(req.target_xkey, target.public_key());
    assert!(!req.transcode);
    let reply: Envelope<DownloadResponse> = serde_json::from_str(s(&v, "reply_json")).expect("reply parses");
    assert_eq!(reply.code, 200);
    let data = reply.data.expect("reply data");
    assert!(data.acknowledged);
    assert_eq!(data.chunk_size, 4096);
    assert_eq!(protocol::V1_CHUNK_SIZE, 4096);
    assert_eq!(data.total_bytes, file.len() as u64);
    assert_eq!(data.total_chunks, 2);
    assert_eq!(data.sender_xkey, sender.public_key());
    let ours = Envelope::ok(data);
    assert_eq!(String::from_utf8(ours).unwrap(), s(&v, "reply_json"), "our v1 reply is not the original's bytes");

    // The crate's header names are the literal ones.
    assert_eq!(
        [protocol::HEADER_CHUNK_INDEX, protocol::HEADER_SENDER_XKEY, protocol::HEADER_TOTAL_CHUNKS],
        LITERAL_HEADERS
    );
    assert_eq!(s(&v, "request_subject"), protocol_subject("media", "download"));

    // Every committed chunk: literal headers, the xkv1 seal format, and it opens to its slice.
    let chunks = v["chunks"].as_array().expect("chunks");
    assert_eq!(chunks.len(), 2);
    for (i, c) in chunks.iter().enumerate() {
        let headers = c["headers"].as_object().expect("headers");
        let names: Vec<&str> = headers.keys().map(String::as_str).collect();
        assert_eq!(names, LITERAL_HEADERS, "chunk {i} header names");
        assert_eq!(headers["x-natster-chunk-idx"], i.to_string().as_str());
        assert_eq!(headers["x-natster-total-chunks"], "2");
        assert_eq!(headers["x-natster-sender-xkey"], sender.public_key().as_str());
        let sealed = hex::decode(s(c, "sealed_hex")).expect("sealed hex");
        let len = c["plaintext_len"].as_u64().unwrap() as usize;
        assert_eq!(&sealed[..4], b"xkv1", "xkey seal version tag");
        assert_eq!(sealed.len(), 4 + 24 + 16 + len, "xkv1 || nonce || box(plaintext)");
        let sender_public = nkeys::XKey::from_public_key(&sender.public_key()).unwrap();
        let plain = target.open(&sealed, &sender_public).unwrap_or_else(|e| panic!("chunk {i} does not open: {e}"));
        assert_eq!(plain, file[i * 4096..(i * 4096 + len)], "chunk {i} plaintext");
        // Only the target can open it.
        assert!(nkeys::XKey::new().open(&sealed, &sender_public).is_err(), "a stranger opened chunk {i}");
    }
}

/// One chunk as the vector has it: subject, literal headers (name, value), plaintext.
type VectorChunk = (String, Vec<(String, String)>, Vec<u8>);

fn protocol_subject(catalog: &str, op: &str) -> String {
    format!("natster.catalog.{catalog}.{op}")
}

/// A fake original peer: answers `download` with the vector's reply bytes verbatim, then
/// publishes the vector's chunks with its literal headers, sealed (fresh nonce) by the
/// vector's sender key for the reader's target key. Our client must reassemble the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_downloads_from_an_original_peer_speaking_the_vector() {
    let v = vector();
    let file = file_bytes(&v);
    let hash = s(&v["file"], "sha256").to_string();
    let nats = NatsServer::start();
    let peer = connect(&nats.url()).await;
    let mut requests = peer.subscribe(s(&v, "request_subject").to_string()).await.unwrap();
    peer.flush().await.unwrap();
    let reply_json = s(&v, "reply_json").to_string();
    let sender = nkeys::XKey::from_seed(s(&v, "sender_seed")).unwrap();
    // (subject, literal headers, plaintext) of each chunk, as the vector has them.
    let chunks: Vec<VectorChunk> = v["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let headers = c["headers"].as_object().unwrap();
            let headers = headers.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
            let len = c["plaintext_len"].as_u64().unwrap() as usize;
            (s(c, "subject").to_string(), headers, file[i * 4096..i * 4096 + len].to_vec())
        })
        .collect();
    let peer_task = tokio::spawn(async move {
        let msg = requests.next().await.expect("a download request");
        let req: Value = serde_json::from_slice(&msg.payload).expect("request is JSON");
        // The request has the original's field names.
        let mut keys: Vec<&str> = req.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["hash", "target_xkey", "transcode"], "{req}");
        let target = nkeys::XKey::from_public_key(req["target_xkey"].as_str().unwrap()).expect("target xkey");
        peer.publish(msg.reply.unwrap(), reply_json.into_bytes().into()).await.unwrap();
        for (subject, literal, plain) in chunks {
            let mut headers = async_nats::HeaderMap::new();
            for (name, value) in &literal {
                headers.insert(name.as_str(), value.as_str());
            }
            let sealed = sender.seal(&plain, &target).unwrap();
            peer.publish_with_headers(subject, headers, sealed.into()).await.unwrap();
        }
        peer.flush().await.unwrap();
    });
    let client = catalog_client(&connect(&nats.url()).await, "media");
    let mut got = Vec::new();
    let written = within(
        "download_v1 from the vector peer",
        client.download_v1(&hash, |b| {
            got.extend_from_slice(b);
            Ok(())
        }),
    )
    .await
    .expect("download_v1 from an original peer");
    assert_eq!(written, file.len() as u64);
    assert!(got == file, "reassembled bytes differ");
    within("the fake peer", peer_task).await.expect("fake peer");
}

/// Our server, serving the vector's file: its reply has the vector's fields and values
/// (except the per-download sender key), its chunks carry exactly the literal header names
/// with the vector's values, are 4096 bytes of plaintext each, and open for the target seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_server_answers_a_download_as_the_vector_does() {
    let v = vector();
    let file = file_bytes(&v);
    let hash = s(&v["file"], "sha256").to_string();
    let nats = NatsServer::start();
    let home = TestHome::new();
    home.init(&nats.url()).await;
    let tree = tempfile::tempdir().unwrap();
    write_file(tree.path(), s(&v["file"], "path"), &file);
    home.run_async(["catalog", "new", s(&v, "catalog"), tree.path().to_str().unwrap()])
        .await
        .assert_success("catalog new");
    let _served = Served::start_with(&home, &nats, s(&v, "catalog"), &["--v1"]).await;
    let target = nkeys::XKey::from_seed(s(&v, "target_seed")).unwrap();

    let client = connect(&nats.url()).await;
    let vector_chunks = v["chunks"].as_array().unwrap();
    assert_eq!(s(&vector_chunks[0], "subject"), format!("natster.media.{}.{hash}", s(&v, "catalog")));
    let mut sub = client.subscribe(s(&vector_chunks[0], "subject").to_string()).await.unwrap();
    client.flush().await.unwrap();
    // The vector's request, byte for byte.
    let reply = tokio::time::timeout(
        REQUEST_TIMEOUT,
        client.request(s(&v, "request_subject").to_string(), s(&v, "request_json").to_string().into()),
    )
    .await
    .expect("download reply in time")
    .expect("download reply");
    let ours: Value = serde_json::from_slice(&reply.payload).expect("reply JSON");
    let mut want: Value = serde_json::from_str(s(&v, "reply_json")).unwrap();
    let sender_xkey = ours["data"]["sender_xkey"].as_str().expect("sender_xkey").to_string();
    assert!(nkeys::XKey::from_public_key(&sender_xkey).is_ok(), "sender_xkey is an xkey: {sender_xkey}");
    want["data"]["sender_xkey"] = Value::String(sender_xkey.clone());
    assert_eq!(ours, want, "our reply differs from the original's in shape or values");

    let mut got: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let sender = nkeys::XKey::from_public_key(&sender_xkey).unwrap();
    while got.len() < vector_chunks.len() {
        let msg = tokio::time::timeout(CHUNK_WAIT, sub.next()).await.expect("a chunk in time").expect("subscription");
        let headers = msg.headers.as_ref().expect("chunk headers");
        let mut names: Vec<String> = headers.iter().map(|(k, _)| k.to_string()).collect();
        names.sort();
        assert_eq!(names, LITERAL_HEADERS, "header names of a chunk");
        let get = |name: &str| headers.get(name).map(|h| h.as_str().to_string()).unwrap_or_default();
        let index: u64 = get("x-natster-chunk-idx").parse().expect("numeric chunk index");
        let expected = &vector_chunks[index as usize]["headers"];
        assert_eq!(get("x-natster-total-chunks"), s(expected, "x-natster-total-chunks"));
        assert_eq!(get("x-natster-sender-xkey"), sender_xkey);
        let sealed_len = hex::decode(s(&vector_chunks[index as usize], "sealed_hex")).unwrap().len();
        assert_eq!(msg.payload.len(), sealed_len, "chunk {index}: sealed size differs from the original's");
        let plain = target.open(&msg.payload, &sender).expect("our chunk opens with the vector's target seed");
        got.insert(index, plain);
    }
    let joined: Vec<u8> = got.into_values().flatten().collect();
    assert!(joined == file, "our server's chunks do not reassemble the file");
}

/// An original server that transcodes an mp4 on the fly sends other bytes than the listed
/// file (and says so in `x-natster-transcoding`): our client refuses them with a message
/// saying why, instead of a bare authentication failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcoded_bytes_from_an_original_peer_are_refused_with_the_reason() {
    let v = vector();
    let hash = s(&v["file"], "sha256").to_string();
    let nats = NatsServer::start();
    let peer = connect(&nats.url()).await;
    let mut requests = peer.subscribe(s(&v, "request_subject").to_string()).await.unwrap();
    peer.flush().await.unwrap();
    let reply_json = s(&v, "reply_json").to_string();
    let sender = nkeys::XKey::from_seed(s(&v, "sender_seed")).unwrap();
    let first = &v["chunks"][0];
    let subject = s(first, "subject").to_string();
    let literal: Vec<(String, String)> = first["headers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let peer_task = tokio::spawn(async move {
        let msg = requests.next().await.expect("a download request");
        let req: Value = serde_json::from_slice(&msg.payload).expect("request is JSON");
        let target = nkeys::XKey::from_public_key(req["target_xkey"].as_str().unwrap()).expect("target xkey");
        peer.publish(msg.reply.unwrap(), reply_json.into_bytes().into()).await.unwrap();
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in &literal {
            headers.insert(name.as_str(), value.as_str());
        }
        headers.insert("x-natster-transcoding", "true");
        // A transcoded piece: sealed correctly, but not the listed file's bytes or length.
        let sealed = sender.seal(&[7u8; 1000], &target).unwrap();
        peer.publish_with_headers(subject, headers, sealed.into()).await.unwrap();
        peer.flush().await.unwrap();
    });
    let client = catalog_client(&connect(&nats.url()).await, "media");
    let err = within("download_v1 of a transcoded file", client.download_v1(&hash, |_| Ok(())))
        .await
        .expect_err("transcoded bytes were accepted");
    assert!(matches!(err, natster_mount::client::ClientError::Transcoded(_)), "{err}");
    assert!(err.to_string().contains("transcoded bytes"), "{err}");
    within("the fake peer", peer_task).await.expect("fake peer");
}
