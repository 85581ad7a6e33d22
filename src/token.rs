//! Session tokens: what the client holds, and the hash the stores keep.
//!
//! A token is 32 bytes from the OS CSPRNG followed by a 16-byte
//! HMAC-SHA256 tag of those bytes under the gateway's token key, written
//! as 64 characters of unpadded base64url. The tag lets the gateway turn
//! away a forged or mistyped token without asking any store: a flood of
//! random well-formed tokens costs one HMAC each, never a database query.
//! The stores only ever see [`TokenHash`], the SHA-256 of the token bytes,
//! so a leaked database or Redis dump holds nothing a client could replay.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

const RANDOM_LEN: usize = 32;
const TAG_LEN: usize = 16;
const RAW_LEN: usize = RANDOM_LEN + TAG_LEN;
/// Length of a token's text form.
pub const TOKEN_LEN: usize = 64;

/// What the stores key a session by.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_slice(bytes: &[u8]) -> Option<TokenHash> {
        bytes.try_into().ok().map(TokenHash)
    }

    pub fn to_hex(&self) -> String {
        // On the Redis request path (the key): no formatting machinery.
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(64);
        for b in self.0 {
            out.push(DIGITS[(b >> 4) as usize] as char);
            out.push(DIGITS[(b & 0xf) as usize] as char);
        }
        out
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A prefix is enough to tell hashes apart in a test failure.
        write!(f, "TokenHash({}…)", &self.to_hex()[..12])
    }
}

/// Why a presented token was turned away before any store was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MalformedToken {
    #[error("the token has the wrong length")]
    Length,
    #[error("the token is not base64url")]
    Encoding,
    #[error("the token was not issued by this gateway")]
    Signature,
}

/// The key that tags tokens; shared by every instance on the same stores.
#[derive(Clone)]
pub struct TokenKey {
    mac: Hmac<Sha256>,
}

impl TokenKey {
    pub fn new(secret: &[u8]) -> TokenKey {
        TokenKey {
            mac: Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length"),
        }
    }

    /// 32 fresh bytes from the OS CSPRNG, for a key kept in the store.
    pub fn generate_secret() -> Vec<u8> {
        let mut secret = vec![0u8; 32];
        getrandom::fill(&mut secret).expect("the OS random source is available");
        secret
    }

    /// A new token and the hash the stores will know it by.
    pub fn issue(&self) -> (String, TokenHash) {
        let mut raw = [0u8; RAW_LEN];
        getrandom::fill(&mut raw[..RANDOM_LEN]).expect("the OS random source is available");
        let tag = self.tag(&raw[..RANDOM_LEN]);
        raw[RANDOM_LEN..].copy_from_slice(&tag[..TAG_LEN]);
        (URL_SAFE_NO_PAD.encode(raw), hash_raw(&raw))
    }

    /// Checks a presented token and returns its hash.
    pub fn verify(&self, token: &str) -> Result<TokenHash, MalformedToken> {
        let bytes = token.as_bytes();
        if bytes.len() != TOKEN_LEN {
            return Err(MalformedToken::Length);
        }
        let mut raw = [0u8; RAW_LEN];
        match URL_SAFE_NO_PAD.decode_slice(bytes, &mut raw) {
            Ok(RAW_LEN) => {}
            _ => return Err(MalformedToken::Encoding),
        }
        let mut mac = self.mac.clone();
        mac.update(&raw[..RANDOM_LEN]);
        mac.verify_truncated_left(&raw[RANDOM_LEN..])
            .map_err(|_| MalformedToken::Signature)?;
        Ok(hash_raw(&raw))
    }

    fn tag(&self, data: &[u8]) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }
}

/// Whether `text` has the shape of a sessiongate token (not whether it is
/// valid): used to decide which bearer tokens are ours to keep from the
/// upstream.
pub fn looks_like_token(text: &str) -> bool {
    text.len() == TOKEN_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn hash_raw(raw: &[u8; RAW_LEN]) -> TokenHash {
    TokenHash(Sha256::digest(raw).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_to_their_hash() {
        let key = TokenKey::new(b"0123456789abcdef0123456789abcdef");
        let (token, hash) = key.issue();
        assert_eq!(token.len(), TOKEN_LEN);
        assert!(looks_like_token(&token));
        assert_eq!(key.verify(&token), Ok(hash));
    }

    #[test]
    fn tokens_are_distinct() {
        let key = TokenKey::new(b"k");
        let (a, ha) = key.issue();
        let (b, hb) = key.issue();
        assert_ne!(a, b);
        assert_ne!(ha, hb);
    }

    #[test]
    fn forged_and_garbled_tokens_are_rejected() {
        let key = TokenKey::new(b"one key");
        let other = TokenKey::new(b"another key");
        let (token, _) = other.issue();
        assert_eq!(key.verify(&token), Err(MalformedToken::Signature));
        assert_eq!(key.verify("short"), Err(MalformedToken::Length));
        let bad = "!".repeat(TOKEN_LEN);
        assert_eq!(key.verify(&bad), Err(MalformedToken::Encoding));
        let (mut good, _) = key.issue();
        // Flip one character of the random part.
        let c = if good.starts_with('A') { "B" } else { "A" };
        good.replace_range(0..1, c);
        assert_eq!(key.verify(&good), Err(MalformedToken::Signature));
    }

    #[test]
    fn hex_is_lowercase_and_complete() {
        let mut bytes = [0u8; 32];
        bytes[0] = 0xab;
        bytes[31] = 0x0f;
        let hex = TokenHash(bytes).to_hex();
        assert_eq!(hex.len(), 64);
        assert!(hex.starts_with("ab00"));
        assert!(hex.ends_with("000f"));
    }

    #[test]
    fn the_hash_is_not_the_token() {
        let key = TokenKey::new(b"k");
        let (token, hash) = key.issue();
        assert!(!hash.to_hex().contains(&token));
        assert_ne!(hash.as_bytes().as_slice(), token.as_bytes());
    }
}
