//! End-to-end encryption of media.
//!
//! v2: each side makes an ephemeral X25519 key (sent as an nkeys xkey string); the session key
//! is HKDF-SHA256 over their shared secret, bound to the session id, catalog, file hash and both
//! public keys. Each chunk is `nonce(24) || XChaCha20-Poly1305(plaintext)` with associated data
//! binding session and chunk index, so a chunk cannot be replayed into another session or slot.
//! A record of a `read` that named its own unit binds that unit too (`session ‖ index ‖
//! unit`): record 3 of 16 KiB units can never pass for chunk 3 of the session's chunk size.
//!
//! v1: the original's nkeys xkey box (`xkv1` + nonce + XSalsa20-Poly1305), per chunk.

use chacha20poly1305::aead::inout::InOutBuf;
use chacha20poly1305::aead::{Aead, AeadInOut, KeyInit, Payload};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("peer key is not a valid xkey public key")]
    BadPeerKey,
    #[error("key agreement produced a degenerate secret (peer sent a low-order key)")]
    Degenerate,
    #[error("chunk {0} failed authentication (tampered, truncated or from another session)")]
    Authentication(u64),
}

/// An ephemeral X25519 key pair whose public half travels as an xkey string (`X…`).
pub struct EphemeralKey {
    secret: StaticSecret,
    public_xkey: String,
}

impl EphemeralKey {
    pub fn generate() -> Self {
        let mut raw = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let public_xkey = nkeys::XKey::new_from_raw(raw).public_key();
        let secret = StaticSecret::from(raw);
        raw.fill(0);
        EphemeralKey { secret, public_xkey }
    }

    pub fn public_xkey(&self) -> &str {
        &self.public_xkey
    }

    /// Derives the session key with the peer's public xkey.
    pub fn agree(&self, peer_xkey: &str, binding: &SessionBinding<'_>) -> Result<SessionKey, CryptoError> {
        let peer = decode_xkey(peer_xkey)?;
        let shared = self.secret.diffie_hellman(&PublicKey::from(peer));
        if !shared.was_contributory() {
            return Err(CryptoError::Degenerate);
        }
        let hk = Hkdf::<Sha256>::new(Some(binding.session.as_bytes()), shared.as_bytes());
        let mut info = Vec::with_capacity(256);
        info.extend_from_slice(b"natster-mount v2 chunk key\0");
        for part in [binding.catalog, binding.hash, binding.client_xkey, binding.server_xkey] {
            info.extend_from_slice(part.as_bytes());
            info.push(0);
        }
        let mut key = [0u8; 32];
        // 32 bytes is always a valid HKDF-SHA256 output length.
        hk.expand(&info, &mut key).map_err(|_| CryptoError::Degenerate)?;
        let cipher = XChaCha20Poly1305::new(&key.into());
        key.fill(0);
        Ok(SessionKey { cipher, session: binding.session.as_bytes().to_vec() })
    }
}

/// Everything the session key is bound to.
pub struct SessionBinding<'a> {
    pub session: &'a str,
    pub catalog: &'a str,
    pub hash: &'a str,
    pub client_xkey: &'a str,
    pub server_xkey: &'a str,
}

fn decode_xkey(xkey: &str) -> Result<[u8; 32], CryptoError> {
    // XKey::from_public_key checks the curve prefix and checksum; from_public_key gives the raw bytes.
    nkeys::XKey::from_public_key(xkey).map_err(|_| CryptoError::BadPeerKey)?;
    nkeys::from_public_key(xkey).map(|(_, raw)| raw).map_err(|_| CryptoError::BadPeerKey)
}

/// The xkey string (`X…`) of a raw X25519 public key: how a peer would send any point,
/// including a malicious one (nkeys only encodes keys it derived itself).
pub fn xkey_from_raw_public(raw: [u8; 32]) -> String {
    const CURVE_PREFIX: u8 = 23 << 3;
    let mut data = Vec::with_capacity(35);
    data.push(CURVE_PREFIX);
    data.extend_from_slice(&raw);
    let mut crc = 0u16;
    for byte in &data {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    data.extend_from_slice(&crc.to_le_bytes());
    data_encoding::BASE32_NOPAD.encode(&data)
}

/// True if `xkey` is a valid xkey whose X25519 point has small order: a shared secret with it is
/// the same for every party (all zeros), so nothing sealed to it is secret.
pub fn is_low_order_xkey(xkey: &str) -> bool {
    let Ok(raw) = decode_xkey(xkey) else { return false };
    let probe = StaticSecret::random_from_rng(rand::rngs::OsRng);
    !probe.diffie_hellman(&PublicKey::from(raw)).was_contributory()
}

/// A session's chunk cipher.
pub struct SessionKey {
    cipher: XChaCha20Poly1305,
    session: Vec<u8>,
}

impl SessionKey {
    fn aad(&self, index: u64, unit: Option<u32>) -> Vec<u8> {
        let mut aad = Vec::with_capacity(self.session.len() + 12);
        aad.extend_from_slice(&self.session);
        aad.extend_from_slice(&index.to_be_bytes());
        if let Some(unit) = unit {
            aad.extend_from_slice(&unit.to_be_bytes());
        }
        aad
    }

    /// Seals chunk `index`: a fresh random nonce followed by the ciphertext and tag.
    pub fn seal(&self, index: u64, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = self.aad(index, None);
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        // Encryption with a valid key cannot fail for inputs below the 256 GiB AEAD limit.
        let sealed =
            self.cipher.encrypt(&XNonce::from(nonce), Payload { msg: plaintext, aad: &aad }).unwrap_or_default();
        out.extend_from_slice(&sealed);
        out
    }

    /// Seals chunk `index` in place: `buf` holds `NONCE_LEN` spare bytes followed by the
    /// plaintext, and becomes `nonce || ciphertext || tag` without another copy.
    pub fn seal_in_place(&self, index: u64, buf: &mut Vec<u8>) {
        self.seal_record_in_place(index, None, buf)
    }

    /// [`SessionKey::seal_in_place`] for record `index` of `unit`-byte records (None: the
    /// session's chunk size).
    pub fn seal_record_in_place(&self, index: u64, unit: Option<u32>, buf: &mut Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        buf[..NONCE_LEN].copy_from_slice(&nonce);
        let aad = self.aad(index, unit);
        // Cannot fail below the AEAD's 256 GiB message limit.
        if let Ok(tag) = self.cipher.encrypt_inout_detached(&XNonce::from(nonce), &aad, (&mut buf[NONCE_LEN..]).into())
        {
            buf.extend_from_slice(&tag);
        }
    }

    /// Opens chunk `index` in place, returning the plaintext without copying it.
    pub fn open_in_place(&self, index: u64, sealed: bytes::Bytes) -> Result<bytes::Bytes, CryptoError> {
        self.open_record_in_place(index, None, sealed)
    }

    /// [`SessionKey::open_in_place`] for record `index` of `unit`-byte records.
    pub fn open_record_in_place(
        &self,
        index: u64,
        unit: Option<u32>,
        sealed: bytes::Bytes,
    ) -> Result<bytes::Bytes, CryptoError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Authentication(index));
        }
        let aad = self.aad(index, unit);
        let body_end = sealed.len() - TAG_LEN;
        let open = |nonce: &[u8], tag: &[u8], body: InOutBuf<'_, '_, u8>| {
            let (Ok(nonce), Ok(tag)) = (XNonce::try_from(nonce), Tag::try_from(tag)) else {
                return Err(CryptoError::Authentication(index));
            };
            self.cipher.decrypt_inout_detached(&nonce, &aad, body, &tag).map_err(|_| CryptoError::Authentication(index))
        };
        // A unique, tight buffer is decrypted where it is. Anything else is decrypted out of
        // it into memory of its own (chunk_memory), in the same pass: a slice of a larger
        // network buffer would otherwise pin all of it for as long as the chunk stays cached,
        // and the cache's byte budget would not be the memory used.
        let shared = match sealed.try_into_mut() {
            Ok(mut own) if own.capacity() <= own.len() + own.len() / 16 + 64 => {
                let (head, tag) = own.split_at_mut(body_end);
                let (nonce, body) = head.split_at_mut(NONCE_LEN);
                open(nonce, tag, body.into())?;
                let mut plain = own.freeze();
                plain.truncate(body_end);
                return Ok(plain.slice(NONCE_LEN..));
            }
            Ok(own) => own.freeze(),
            Err(shared) => shared,
        };
        let body = &shared[NONCE_LEN..body_end];
        let mut plain = crate::chunk_memory::ChunkBuffer::with_len(body.len());
        let into = InOutBuf::new(body, plain.as_mut_slice()).map_err(|_| CryptoError::Authentication(index))?;
        open(&shared[..NONCE_LEN], &shared[body_end..], into)?;
        Ok(plain.freeze())
    }

    /// Opens chunk `index`; any modification, truncation or replay fails.
    pub fn open(&self, index: u64, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Authentication(index));
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).map_err(|_| CryptoError::Authentication(index))?;
        let aad = self.aad(index, None);
        self.cipher.decrypt(&nonce, Payload { msg: body, aad: &aad }).map_err(|_| CryptoError::Authentication(index))
    }
}

/// A random 128-bit session id in hex.
pub fn new_session_id() -> String {
    let mut id = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut id);
    hex::encode(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cipher matches XChaCha20-Poly1305 as specified, on whichever backend this CPU
    /// picked (AVX-512, AVX2, SSE2): the draft's vector (draft-irtf-cfrg-xchacha-03, A.3.1),
    /// and a 300,000-byte message that runs the wide backends' bulk path, whose expected
    /// ciphertext digest and tag come from libsodium's implementation.
    #[test]
    fn the_cipher_matches_known_answers_on_this_cpus_backend() {
        use sha2::Digest;
        let key: [u8; 32] = std::array::from_fn(|i| 0x80 + i as u8);
        let nonce: [u8; 24] = std::array::from_fn(|i| 0x40 + i as u8);
        let aad = hex::decode("50515253c0c1c2c3c4c5c6c7").unwrap();
        let cipher = XChaCha20Poly1305::new(&key.into());
        let seal = |msg: &[u8]| cipher.encrypt(&XNonce::from(nonce), Payload { msg, aad: &aad }).unwrap();
        let short = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        assert_eq!(
            hex::encode(seal(short)),
            "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb731c7f1b0b4aa6440bf3a82f4eda7e39\
             ae64c6708c54c216cb96b72e1213b4522f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9\
             21f9664c97637da9768812f615c68b13b52ec0875924c1c7987947deafd8780acf49"
        );
        let long: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sealed = seal(&long);
        assert_eq!(sealed.len(), long.len() + TAG_LEN);
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&sealed)),
            "b2b4976bb3aa4f7a8b13ee768524003a8d889c8db49a0a24bc626445a663c758"
        );
        assert_eq!(hex::encode(&sealed[long.len()..]), "bbab88a29aad2597dd7f5723ec1ecc80");
    }

    #[test]
    fn low_order_xkeys_are_recognised() {
        let real = EphemeralKey::generate();
        let raw = decode_xkey(real.public_xkey()).unwrap();
        assert_eq!(xkey_from_raw_public(raw), real.public_xkey(), "encoding matches nkeys'");
        assert!(!is_low_order_xkey(real.public_xkey()));
        // 0 and 1 are points of small order on Curve25519.
        let mut one = [0u8; 32];
        one[0] = 1;
        for raw in [[0u8; 32], one] {
            let xkey = xkey_from_raw_public(raw);
            assert!(nkeys::XKey::from_public_key(&xkey).is_ok(), "a valid xkey string");
            assert!(is_low_order_xkey(&xkey));
        }
    }

    fn pair() -> (SessionKey, SessionKey) {
        let client = EphemeralKey::generate();
        let server = EphemeralKey::generate();
        let binding = SessionBinding {
            session: "00112233445566778899aabbccddeeff",
            catalog: "c",
            hash: "h",
            client_xkey: client.public_xkey(),
            server_xkey: server.public_xkey(),
        };
        let a = client.agree(server.public_xkey(), &binding).unwrap();
        let b = server.agree(client.public_xkey(), &binding).unwrap();
        (a, b)
    }

    #[test]
    fn both_sides_derive_the_same_key() {
        let (client, server) = pair();
        let sealed = server.seal(7, b"hello");
        assert_eq!(client.open(7, &sealed).unwrap(), b"hello");
    }

    #[test]
    fn in_place_variants_match() {
        let (client, server) = pair();
        let mut buf = vec![0u8; NONCE_LEN];
        buf.extend_from_slice(b"in place");
        server.seal_in_place(9, &mut buf);
        assert_eq!(client.open(9, &buf).unwrap(), b"in place");
        let sealed = server.seal(9, b"in place");
        assert_eq!(&client.open_in_place(9, bytes::Bytes::from(sealed.clone())).unwrap()[..], b"in place");
        assert!(client.open_in_place(8, bytes::Bytes::from(sealed)).is_err());
    }

    /// A record in a shared network buffer is decrypted out of it (into a mapping of its own
    /// when large), and is refused without a byte of output when tampered.
    #[test]
    fn a_shared_buffer_is_opened_into_a_buffer_of_its_own() {
        let (client, server) = pair();
        for len in [100usize, crate::chunk_memory::OWN_MAPPING_MIN + 3] {
            let plain: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let mut buf = vec![0u8; NONCE_LEN];
            buf.extend_from_slice(&plain);
            server.seal_in_place(5, &mut buf);
            let sealed = bytes::Bytes::from(buf);
            let held = sealed.clone(); // as a NATS read buffer holds it
            let opened = client.open_in_place(5, sealed.clone()).unwrap();
            assert_eq!(&opened[..], &plain[..], "{len} bytes");
            assert!(!std::ptr::eq(opened.as_ptr(), held[NONCE_LEN..].as_ptr()), "opened where it was shared");
            let mut forged = held.to_vec();
            forged[NONCE_LEN + len / 2] ^= 1;
            let forged = bytes::Bytes::from(forged);
            let _shared = forged.clone();
            assert_eq!(client.open_in_place(5, forged), Err(CryptoError::Authentication(5)));
        }
    }

    #[test]
    fn a_record_binds_its_unit() {
        let (client, server) = pair();
        let mut buf = vec![0u8; NONCE_LEN];
        buf.extend_from_slice(b"one leaf");
        server.seal_record_in_place(3, Some(16384), &mut buf);
        let sealed = bytes::Bytes::from(buf);
        assert!(client.open_record_in_place(3, Some(16384), sealed.clone()).is_ok());
        assert!(client.open_record_in_place(3, Some(32768), sealed.clone()).is_err(), "another unit");
        assert!(client.open_in_place(3, sealed.clone()).is_err(), "the session's chunk 3");
        assert!(client.open_record_in_place(4, Some(16384), sealed).is_err(), "another index");
    }

    #[test]
    fn tampering_and_replay_fail() {
        let (client, server) = pair();
        let mut sealed = server.seal(3, b"chunk bytes");
        assert_eq!(client.open(4, &sealed), Err(CryptoError::Authentication(4)));
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(client.open(3, &sealed), Err(CryptoError::Authentication(3)));
        assert!(client.open(3, &sealed[..10]).is_err());
    }

    #[test]
    fn foreign_keys_are_refused() {
        let k = EphemeralKey::generate();
        let account = nkeys::KeyPair::new_account().public_key();
        let binding = SessionBinding { session: "s", catalog: "c", hash: "h", client_xkey: "", server_xkey: "" };
        assert_eq!(k.agree(&account, &binding).err(), Some(CryptoError::BadPeerKey));
        assert_eq!(k.agree("Xgarbage", &binding).err(), Some(CryptoError::BadPeerKey));
    }
}
