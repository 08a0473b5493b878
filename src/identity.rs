//! Who may connect to NATS, and what each connection may do: decentralized JWT authentication.
//!
//! NATS is run in *operator mode*: the server trusts one operator (its JWT is in the server's
//! configuration), the operator vouches for two accounts (the system account and the crmsync
//! account), and each account vouches for its users. Every user holds a `.creds` file: its user
//! JWT (its permissions, signed by the account) and its nkey seed (to prove, at connect time,
//! that it owns the key the JWT names). Why this rather than users listed in the server's
//! configuration:
//!
//! - **The server decides alone.** A connection's permissions are in its own signed JWT; the
//!   server checks the signature chain up to the operator and enforces the subjects it names.
//!   No callout and no directory is asked, so a remote's rights cannot be widened by anything
//!   but a JWT signed with the crmsync account's key.
//! - **Remotes keep syncing while the main is down.** Nothing the main runs takes part in
//!   authentication: remotes connect, pull and upload against the server alone.
//! - **10,000 users are just 10,000 JWTs.** The server's configuration never lists users; a new
//!   remote is a new JWT signed here, nothing is reloaded.
//! - **Revocation without a restart.** Revoking a user is re-issuing the account JWT with that
//!   user's key in `revocations`, and pushing it to the running server through the system
//!   account ([`CLAIMS_UPDATE_SUBJECT`]). The `full` resolver keeps the pushed JWT in its
//!   directory, so it survives restarts (a newer JWT is never replaced by an older preload).
//!
//! The JWTs are built by hand (no JWT crate): `base64url(header).base64url(claims).
//! base64url(ed25519 signature of the first two parts by the issuer's nkey)`, all without
//! padding, with the header `{"typ":"JWT","alg":"ed25519-nkey"}` and the NATS v2 claims
//! (`nats.type`, `nats.version = 2`). The field names follow the Go library
//! (`github.com/nats-io/jwt/v2`), which is what the server decodes with.
//!
//! What a remote may do is [`remote_permissions`]: its own consumer on `CRM_SYNC` (info, pull,
//! acknowledge, reset), last-message reads of its own set and subscription list, uploads on
//! its own `crm.up.<remote>.>` subjects, and replies on its own inbox prefix
//! ([`inbox_prefix`], which the remote's client must set with
//! `ConnectOptions::custom_inbox_prefix`). Everything else is refused by the server.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use nkeys::KeyPair;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The crmsync account's name in its JWT (a label: the server knows accounts by public key).
pub const ACCOUNT_NAME: &str = "CRMSYNC";
/// The system account's name in its JWT.
pub const SYSTEM_ACCOUNT_NAME: &str = "SYS";
use crate::wire::{MERGER, SYNC_STREAM, Target, UP_STREAM, target_filter, up_filter};

/// Where the system account pushes an account JWT (payload: the JWT itself). The server answers
/// `{"data":{"account":..,"code":200,"message":"jwt updated"}}`, or `{"error":{..}}`.
pub const CLAIMS_UPDATE_SUBJECT: &str = "$SYS.REQ.CLAIMS.UPDATE";

/// Why a JWT, a creds file or a name was refused.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{what} {name:?} is not a subject token: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'")]
    BadName { what: &'static str, name: String },
    #[error("bad nkey: {0}")]
    Key(#[from] nkeys::error::Error),
    #[error("malformed JWT: {0}")]
    Malformed(String),
    #[error("the JWT's signature does not verify against its issuer {0}")]
    Signature(String),
    #[error("malformed creds file: {0}")]
    Creds(&'static str),
    #[error("the system account's request failed: {0}")]
    System(String),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Json { path: String, source: serde_json::Error },
}

/// The operator, the system account and the crmsync account, with their seeds: everything
/// needed to sign JWTs. Saved as JSON ([`Authority::save`], mode 0600): whoever holds this file
/// can mint any user, so it stays on the main.
#[derive(Clone, Serialize, Deserialize)]
pub struct Authority {
    /// Format of this file.
    pub version: u32,
    /// The operator's identity key: self-signs the operator JWT.
    operator_seed: String,
    /// The operator's signing key: signs the account JWTs.
    operator_signing_seed: String,
    /// The system account (pushes account updates).
    system_account_seed: String,
    /// The crmsync account's identity key (its public key is the account's id).
    account_seed: String,
    /// The crmsync account's signing key: signs every crmsync user JWT.
    account_signing_seed: String,
    /// Revoked user public keys, with the time (Unix seconds) of their revocation: every JWT
    /// of that user issued at or before then is refused. Kept here so every later account JWT
    /// (and the configuration's preload) carries them.
    #[serde(default)]
    revocations: BTreeMap<String, i64>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Public keys only: the seeds are secrets.
        f.debug_struct("Authority")
            .field("operator", &self.operator_public_key())
            .field("system_account", &self.system_account_public_key())
            .field("account", &self.account_public_key())
            .field("revocations", &self.revocations.len())
            .finish()
    }
}

/// A remote's credentials, as [`Authority::remote_creds`] makes them.
#[derive(Debug, Clone)]
pub struct RemoteCreds {
    /// The `.creds` file text.
    pub creds: String,
    /// The user's public key (to revoke it).
    pub user_public_key: String,
    /// The inbox prefix the remote's client must use (`ConnectOptions::custom_inbox_prefix`):
    /// the only subjects it may subscribe to.
    pub inbox_prefix: String,
}

/// Subjects a user may publish to and subscribe to (allow lists: anything else is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

impl Authority {
    /// New keys for the operator, its signing key, the system account, the crmsync account
    /// and its signing key.
    pub fn generate() -> Authority {
        let seed = |kp: KeyPair| kp.seed().expect("a generated key has a seed");
        Authority {
            version: 1,
            operator_seed: seed(KeyPair::new_operator()),
            operator_signing_seed: seed(KeyPair::new_operator()),
            system_account_seed: seed(KeyPair::new_account()),
            account_seed: seed(KeyPair::new_account()),
            account_signing_seed: seed(KeyPair::new_account()),
            revocations: BTreeMap::new(),
        }
    }

    /// Reads an authority saved by [`Authority::save`], checking its seeds.
    pub fn load(path: &Path) -> Result<Authority, IdentityError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Io { path: shown.clone(), source })?;
        let authority: Authority =
            serde_json::from_str(&text).map_err(|source| IdentityError::Json { path: shown, source })?;
        for seed in [
            &authority.operator_seed,
            &authority.operator_signing_seed,
            &authority.system_account_seed,
            &authority.account_seed,
            &authority.account_signing_seed,
        ] {
            KeyPair::from_seed(seed)?;
        }
        Ok(authority)
    }

    /// Writes the authority as JSON, readable by its owner only (0600 from creation, then
    /// renamed over `path`, so the seeds are never readable by others even for a moment).
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let shown = path.display().to_string();
        let io = |source| IdentityError::Io { path: shown.clone(), source };
        let text = serde_json::to_string_pretty(self).expect("an authority serializes");
        let tmp = path.with_extension("tmp");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        {
            use std::io::Write;
            let mut file = options.open(&tmp).map_err(io)?;
            file.write_all(text.as_bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)
    }

    fn key(seed: &str) -> KeyPair {
        KeyPair::from_seed(seed).expect("the authority's seeds were checked")
    }

    pub fn operator_public_key(&self) -> String {
        Self::key(&self.operator_seed).public_key()
    }

    pub fn system_account_public_key(&self) -> String {
        Self::key(&self.system_account_seed).public_key()
    }

    /// The crmsync account's id (the `account` of its connections in the server's monitoring).
    pub fn account_public_key(&self) -> String {
        Self::key(&self.account_seed).public_key()
    }

    /// The operator JWT: self-signed, naming its signing key and the system account.
    pub fn operator_jwt(&self) -> String {
        let operator = Self::key(&self.operator_seed);
        let signing = Self::key(&self.operator_signing_seed);
        let nats = json!({
            "signing_keys": [signing.public_key()],
            "system_account": self.system_account_public_key(),
            "type": "operator",
            "version": 2,
        });
        encode_jwt(&operator, &operator.public_key(), "crmsync", nats)
    }

    /// The system account's JWT (signed by the operator's signing key).
    pub fn system_account_jwt(&self) -> String {
        let nats = json!({
            "limits": account_limits(false),
            "default_permissions": {"pub": {}, "sub": {}},
            "type": "account",
            "version": 2,
        });
        encode_jwt(
            &Self::key(&self.operator_signing_seed),
            &self.system_account_public_key(),
            SYSTEM_ACCOUNT_NAME,
            nats,
        )
    }

    /// The crmsync account's JWT: JetStream enabled without limits, its signing key, and every
    /// revocation made so far.
    pub fn account_jwt(&self) -> String {
        let mut nats = json!({
            "limits": account_limits(true),
            "signing_keys": [Self::key(&self.account_signing_seed).public_key()],
            "default_permissions": {"pub": {}, "sub": {}},
            "type": "account",
            "version": 2,
        });
        if !self.revocations.is_empty() {
            nats["revocations"] = json!(self.revocations);
        }
        encode_jwt(&Self::key(&self.operator_signing_seed), &self.account_public_key(), ACCOUNT_NAME, nats)
    }

    /// The nats-server configuration for decentralized authentication: the operator, the
    /// system account, and a `full` resolver keeping account JWTs in `resolver_dir`, which
    /// accepts JWTs pushed at runtime by the system account ([`CLAIMS_UPDATE_SUBJECT`]). Both
    /// account JWTs are preloaded; one already in the directory wins if it is newer (a pushed
    /// revocation is not undone by a restart with an older configuration).
    pub fn server_config(&self, resolver_dir: &Path) -> String {
        let quote = |s: &str| serde_json::to_string(s).expect("a string serializes");
        format!(
            "operator: {operator}\n\
             system_account: {system}\n\
             resolver: {{\n  type: full\n  dir: {dir}\n  allow_delete: false\n  interval: \"2m\"\n}}\n\
             resolver_preload: {{\n  {system}: {system_jwt}\n  {account}: {account_jwt}\n}}\n",
            operator = quote(&self.operator_jwt()),
            system = self.system_account_public_key(),
            dir = quote(&resolver_dir.display().to_string()),
            system_jwt = quote(&self.system_account_jwt()),
            account = self.account_public_key(),
            account_jwt = quote(&self.account_jwt()),
        )
    }

    /// A user of the crmsync account signed by its signing key.
    fn account_user(&self, user: &KeyPair, name: &str, permissions: Value) -> String {
        let mut nats = json!({
            "subs": -1,
            "data": -1,
            "payload": -1,
            "issuer_account": self.account_public_key(),
            "type": "user",
            "version": 2,
        });
        for (k, v) in permissions.as_object().expect("permissions are an object") {
            nats[k] = v.clone();
        }
        encode_jwt(&Self::key(&self.account_signing_seed), &user.public_key(), name, nats)
    }

    /// Credentials for the main: a crmsync user without restrictions (every subject of the
    /// account, the JetStream API included).
    pub fn main_creds(&self) -> String {
        let user = KeyPair::new_user();
        let jwt = self.account_user(&user, "crmsync-main", json!({"pub": {}, "sub": {}}));
        creds(&jwt, &user.seed().expect("a generated key has a seed"))
    }

    /// Credentials for a user of the system account (pushes account JWTs). Signed by the system account's identity key.
    pub fn system_creds(&self) -> String {
        let user = KeyPair::new_user();
        let nats = json!({
            "pub": {}, "sub": {},
            "subs": -1, "data": -1, "payload": -1,
            "type": "user", "version": 2,
        });
        let jwt = encode_jwt(&Self::key(&self.system_account_seed), &user.public_key(), "crmsync-system", nats);
        creds(&jwt, &user.seed().expect("a generated key has a seed"))
    }

    /// Credentials for remote `remote`, whose durable consumer on `CRM_SYNC` is `consumer` and
    /// whose set is `set`: a new user key, and a JWT signed by the account's signing key with
    /// [`remote_permissions`]. Issue new ones when the remote changes set (its direct reads
    /// name the set).
    pub fn remote_creds(&self, remote: &str, consumer: &str, set: &str) -> Result<RemoteCreds, IdentityError> {
        let p = remote_permissions(remote, consumer, set)?;
        let user = KeyPair::new_user();
        let jwt = self.account_user(
            &user,
            &format!("remote {remote}"),
            json!({"pub": {"allow": p.publish}, "sub": {"allow": p.subscribe}}),
        );
        Ok(RemoteCreds {
            creds: creds(&jwt, &user.seed().expect("a generated key has a seed")),
            user_public_key: user.public_key(),
            inbox_prefix: inbox_prefix(remote)?,
        })
    }

    /// Revokes the user public keys `revoke` as of now (every JWT of theirs issued up to this
    /// second; a key already revoked keeps its date) and takes back the revocation of
    /// `reinstate` (their JWTs are accepted again). Returns whether anything changed; then push
    /// [`Authority::account_jwt`] to the server with `transport::Nats::push_account_jwt`, and
    /// save the authority: later account JWTs must carry the same revocations.
    pub fn revise_revocations(&mut self, revoke: &[String], reinstate: &[String]) -> bool {
        let now = unix_now();
        let mut changed = false;
        for user in revoke {
            if !self.revocations.contains_key(user) {
                self.revocations.insert(user.clone(), now);
                changed = true;
            }
        }
        for user in reinstate {
            changed |= self.revocations.remove(user).is_some();
        }
        changed
    }

    /// The revoked user keys, with when.
    pub fn revocations(&self) -> &BTreeMap<String, i64> {
        &self.revocations
    }
}

/// The inbox prefix of remote `remote`'s client (`_INBOX_<remote>`): its replies (JetStream
/// API answers, publish acks, pulled messages) come there, and it may subscribe nowhere else,
/// so it cannot read the main's or another remote's replies (`_INBOX.>`, `_INBOX_<other>.>`).
pub fn inbox_prefix(remote: &str) -> Result<String, IdentityError> {
    check_name("remote name", remote)?;
    Ok(format!("_INBOX_{remote}"))
}

/// What remote `remote` (consumer `consumer` on `CRM_SYNC`, set `set`) may do; nothing else.
///
/// Publish:
/// - `$JS.API.CONSUMER.INFO.CRM_SYNC.<consumer>`: open its consumer (`Stream::get_consumer`),
///   read its backlog and whether it is halted;
/// - `$JS.API.CONSUMER.MSG.NEXT.CRM_SYNC.<consumer>`: pull (fetch, batch, messages);
/// - `$JS.API.CONSUMER.RESET.CRM_SYNC.<consumer>`: reset it to a sequence (server 2.14);
/// - `$JS.ACK.CRM_SYNC.<consumer>.>`: acknowledge what it pulled;
/// - `$JS.API.DIRECT.GET.CRM_SYNC.crm.sync.<set>.>` and `….crm.sync.~<remote>.>`: the last
///   message on one subject of its set or subscription list (`direct_get_last_for_subject`,
///   which puts the subject in the request subject);
/// - `$JS.API.CONSUMER.INFO.CRM_UP.merger`: whether the main accepts uploads (the merger's
///   consumer is paused or not), shown on the remote's status page;
/// - `crm.up.<remote>.>`: its uploads and session reports (JetStream publishes: the acks come
///   back on its inbox).
///
/// Subscribe: `<inbox_prefix>.>` only. Not allowed, among everything else: pausing, creating,
/// updating or deleting a consumer, stream info, listing streams or consumers, account info.
/// The stream is opened with `Context::get_stream_no_info` (no API call), not `get_stream`.
pub fn remote_permissions(remote: &str, consumer: &str, set: &str) -> Result<Permissions, IdentityError> {
    check_name("remote name", remote)?;
    check_name("consumer name", consumer)?;
    check_name("set name", set)?;
    let s = SYNC_STREAM;
    Ok(Permissions {
        publish: vec![
            format!("$JS.API.CONSUMER.INFO.{s}.{consumer}"),
            format!("$JS.API.CONSUMER.MSG.NEXT.{s}.{consumer}"),
            format!("$JS.API.CONSUMER.RESET.{s}.{consumer}"),
            format!("$JS.ACK.{s}.{consumer}.>"),
            format!("$JS.API.DIRECT.GET.{s}.{}", target_filter(&Target::Set(set.to_owned()))),
            format!("$JS.API.DIRECT.GET.{s}.{}", target_filter(&Target::Subscriptions(remote.to_owned()))),
            format!("$JS.API.CONSUMER.INFO.{UP_STREAM}.{MERGER}"),
            up_filter(remote),
        ],
        subscribe: vec![format!("{}.>", inbox_prefix(remote)?)],
    })
}

/// Checks a name that goes into subjects, by the rule of every crmsync name.
fn check_name(what: &'static str, name: &str) -> Result<(), IdentityError> {
    crate::names::check(what, name).map_err(|_| IdentityError::BadName { what, name: name.to_owned() })
}

/// Account limits: everything unlimited (the Go library's defaults are -1; a missing field
/// reads as 0, which would allow no connection at all), and JetStream enabled without limits
/// for the crmsync account (JetStream is on for an account whose `mem_storage` or
/// `disk_storage` is not 0).
fn account_limits(jetstream: bool) -> Value {
    let mut limits = json!({
        "subs": -1, "data": -1, "payload": -1,
        "imports": -1, "exports": -1, "wildcards": true, "conn": -1, "leaf": -1,
    });
    if jetstream {
        for field in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[field] = json!(-1);
        }
    }
    limits
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs() as i64
}

const JWT_HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// Signs a v2 JWT: `sub` and `name` at the top, `nats` the type-specific claims. `jti` is the
/// base32 of a SHA-256 of the claims without it (an id: the server does not check it).
fn encode_jwt(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let mut claims = json!({
        "iat": unix_now(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let digest = Sha256::digest(serde_json::to_vec(&claims).expect("claims serialize"));
    claims["jti"] = json!(BASE32_NOPAD.encode(&digest));
    let body = format!(
        "{}.{}",
        BASE64URL_NOPAD.encode(JWT_HEADER.as_bytes()),
        BASE64URL_NOPAD.encode(&serde_json::to_vec(&claims).expect("claims serialize"))
    );
    let signature = issuer.sign(body.as_bytes()).expect("a seeded key signs");
    format!("{body}.{}", BASE64URL_NOPAD.encode(&signature))
}

/// Decodes a JWT and verifies its signature against its own `iss` (the chain up to the
/// operator is the server's business). Returns the claims.
pub fn decode_jwt(token: &str) -> Result<Value, IdentityError> {
    let malformed = |why: &str| IdentityError::Malformed(why.to_owned());
    let mut parts = token.trim().split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(malformed("not three dot-separated parts"));
    };
    let decode = |part: &str| BASE64URL_NOPAD.decode(part.as_bytes()).map_err(|e| malformed(&e.to_string()));
    let header: Value = serde_json::from_slice(&decode(h)?).map_err(|e| malformed(&e.to_string()))?;
    if header["alg"] != "ed25519-nkey" || header["typ"] != "JWT" {
        return Err(malformed("header is not {\"typ\":\"JWT\",\"alg\":\"ed25519-nkey\"}"));
    }
    let claims: Value = serde_json::from_slice(&decode(c)?).map_err(|e| malformed(&e.to_string()))?;
    let issuer = claims["iss"].as_str().ok_or_else(|| malformed("no iss"))?;
    let signature = decode(s)?;
    KeyPair::from_public_key(issuer)?
        .verify(format!("{h}.{c}").as_bytes(), &signature)
        .map_err(|_| IdentityError::Signature(issuer.to_owned()))?;
    Ok(claims)
}

/// The `.creds` text of a user: its JWT and its seed, in the standard layout.
pub fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// The JWT and the seed of a `.creds` text (each is the first line after its BEGIN line).
pub fn parse_creds(text: &str) -> Result<(String, String), IdentityError> {
    let after = |marker: &str| {
        let mut lines = text.lines().skip_while(|l| !l.contains(marker));
        lines.next()?;
        lines.map(str::trim).find(|l| !l.is_empty()).map(str::to_owned)
    };
    let jwt = after("BEGIN NATS USER JWT").ok_or(IdentityError::Creds("no user JWT"))?;
    let seed = after("BEGIN USER NKEY SEED").ok_or(IdentityError::Creds("no user seed"))?;
    KeyPair::from_seed(&seed)?;
    Ok((jwt, seed))
}

/// Reads the server's answer to a claims update (a push of an account JWT on
/// [`CLAIMS_UPDATE_SUBJECT`]): `{"data":{"code":200,..}}` is success.
pub fn check_claims_update_reply(payload: &[u8]) -> Result<(), IdentityError> {
    let reply: Value = serde_json::from_slice(payload)
        .map_err(|e| IdentityError::System(format!("unreadable answer to a claims update: {e}")))?;
    if let Some(error) = reply.get("error") {
        return Err(IdentityError::System(format!("claims update refused: {error}")));
    }
    match reply["data"]["code"].as_i64() {
        Some(200) => Ok(()),
        _ => Err(IdentityError::System(format!("unexpected answer to a claims update: {reply}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// API tokens: who a request to a service's HTTP API is made by.
// ---------------------------------------------------------------------------------------------

/// A new token and the hash a user record keeps of it.
/// (SHA-256 rather than a password hash: a token is 256 random bits, not a password a person
/// chose, so no dictionary guesses it, and a slow hash would only slow every request.)
pub fn new_token() -> (String, String) {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system gives random bytes");
    let token = format!("crm_{}", data_encoding::BASE32_NOPAD.encode(&bytes).to_lowercase());
    let hash = token_hash(&token);
    (token, hash)
}

/// The id of a token, shown when it is made and in a user's list of tokens, to revoke it
/// alone: the first 12 hex digits of its hash (not a secret: it does not sign anyone in).
pub fn token_id(hash: &str) -> &str {
    &hash[..hash.len().min(TOKEN_ID_LEN)]
}

/// Hex digits of a token's hash that make its id.
pub const TOKEN_ID_LEN: usize = 12;

/// The hash a user record keeps of `token` (hex SHA-256).
pub fn token_hash(token: &str) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(token.trim().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_kept_as_their_hash() {
        let (a, hash) = new_token();
        let (b, _) = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with("crm_") && a.len() == 4 + 52, "{a}");
        assert_eq!(token_hash(&a), hash);
        assert_eq!(token_hash(&format!("{a}\n")), hash, "a token read from a file keeps working");
        assert_eq!(hash.len(), 64);
        assert!(crate::names::check("a token hash", &hash).is_ok(), "it fits the user's `tokens` field");
    }

    #[test]
    fn jwts_round_trip_and_verify() {
        let a = Authority::generate();
        let op = decode_jwt(&a.operator_jwt()).unwrap();
        assert_eq!(op["iss"], op["sub"], "the operator signs itself");
        assert_eq!(op["nats"]["type"], "operator");
        assert_eq!(op["nats"]["system_account"], a.system_account_public_key().as_str());
        let acc = decode_jwt(&a.account_jwt()).unwrap();
        assert_eq!(acc["sub"], a.account_public_key().as_str());
        assert_eq!(acc["nats"]["version"], 2);
        // Signed by the operator's signing key, which the operator JWT lists.
        assert_eq!(op["nats"]["signing_keys"][0], acc["iss"]);
        assert_eq!(acc["nats"]["limits"]["disk_storage"], -1, "JetStream is enabled");
        assert_eq!(acc["nats"]["limits"]["conn"], -1);
        let sys = decode_jwt(&a.system_account_jwt()).unwrap();
        assert_eq!(sys["sub"], a.system_account_public_key().as_str());
        assert!(sys["nats"]["limits"].get("disk_storage").is_none(), "no JetStream for the system account");
    }

    #[test]
    fn the_jti_is_the_hash_of_the_claims_without_it() {
        let mut claims = decode_jwt(&Authority::generate().account_jwt()).unwrap();
        let jti = claims.as_object_mut().unwrap().remove("jti").unwrap();
        let digest = Sha256::digest(serde_json::to_vec(&claims).unwrap());
        assert_eq!(jti, BASE32_NOPAD.encode(&digest).as_str());
    }

    #[test]
    fn a_tampered_jwt_does_not_verify() {
        let a = Authority::generate();
        let jwt = a.account_jwt();
        let (head, sig) = jwt.rsplit_once('.').unwrap();
        let (h, _) = head.split_once('.').unwrap();
        let forged_claims = BASE64URL_NOPAD.encode(br#"{"iss":"x","sub":"y"}"#);
        let other = Authority::generate().account_jwt();
        let other_claims = other.split('.').nth(1).unwrap();
        assert!(matches!(decode_jwt(&format!("{h}.{other_claims}.{sig}")), Err(IdentityError::Signature(_))));
        assert!(decode_jwt(&format!("{h}.{forged_claims}.{sig}")).is_err());
        assert!(decode_jwt("a.b").is_err());
    }

    #[test]
    fn creds_parse_back_and_the_user_is_signed_by_the_account_signing_key() {
        let a = Authority::generate();
        let r = a.remote_creds("laptop", "remote-laptop", "sales").unwrap();
        assert!(r.creds.starts_with("-----BEGIN NATS USER JWT-----\n"));
        let (jwt, seed) = parse_creds(&r.creds).unwrap();
        let user = KeyPair::from_seed(&seed).unwrap();
        assert_eq!(user.public_key(), r.user_public_key);
        let claims = decode_jwt(&jwt).unwrap();
        assert_eq!(claims["sub"], r.user_public_key.as_str());
        assert_eq!(claims["nats"]["type"], "user");
        assert_eq!(claims["nats"]["issuer_account"], a.account_public_key().as_str());
        let acc = decode_jwt(&a.account_jwt()).unwrap();
        assert_eq!(acc["nats"]["signing_keys"][0], claims["iss"]);
        assert_ne!(claims["iss"], a.account_public_key().as_str(), "signed by the signing key, not the identity key");
        let pubs: Vec<&str> =
            claims["nats"]["pub"]["allow"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(pubs.contains(&"$JS.API.CONSUMER.MSG.NEXT.CRM_SYNC.remote-laptop"));
        assert!(pubs.contains(&"$JS.API.DIRECT.GET.CRM_SYNC.crm.sync.sales.>"));
        assert!(!pubs.iter().any(|p| p.contains("PAUSE") || p.starts_with("crm.sync") || *p == ">"));
        assert_eq!(claims["nats"]["sub"]["allow"], json!(["_INBOX_laptop.>"]));
        for text in [a.main_creds(), a.system_creds()] {
            let (jwt, _) = parse_creds(&text).unwrap();
            decode_jwt(&jwt).unwrap();
        }
        let (sys_jwt, _) = parse_creds(&a.system_creds()).unwrap();
        assert_eq!(decode_jwt(&sys_jwt).unwrap()["iss"], a.system_account_public_key().as_str());
    }

    #[test]
    fn names_that_would_change_the_subjects_are_refused() {
        let a = Authority::generate();
        for bad in ["", "a.b", "a*", ">", "a b", "~x"] {
            assert!(a.remote_creds(bad, "remote-x", "sales").is_err(), "{bad:?}");
            assert!(a.remote_creds("x", bad, "sales").is_err(), "{bad:?}");
            assert!(a.remote_creds("x", "remote-x", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn revocations_are_in_every_later_account_jwt() {
        let mut a = Authority::generate();
        let r = a.remote_creds("laptop", "remote-laptop", "sales").unwrap();
        assert!(decode_jwt(&a.account_jwt()).unwrap()["nats"].get("revocations").is_none());
        assert!(a.revise_revocations(std::slice::from_ref(&r.user_public_key), &[]));
        let jwt = a.account_jwt();
        let claims = decode_jwt(&jwt).unwrap();
        let at = claims["nats"]["revocations"][&r.user_public_key].as_i64().unwrap();
        let (user_jwt, _) = parse_creds(&r.creds).unwrap();
        assert!(decode_jwt(&user_jwt).unwrap()["iat"].as_i64().unwrap() <= at, "the user's JWT is covered");
        let again = decode_jwt(&a.account_jwt()).unwrap();
        assert_eq!(again["nats"]["revocations"][&r.user_public_key], at);
        let config = a.server_config(Path::new("/x"));
        let preloaded = preload_of(&config, &a.account_public_key());
        assert_eq!(decode_jwt(&preloaded).unwrap()["nats"]["revocations"][&r.user_public_key], at);
        // Revoking again changes nothing; reinstating takes the revocation out.
        assert!(!a.revise_revocations(std::slice::from_ref(&r.user_public_key), &[]));
        assert!(a.revise_revocations(&[], std::slice::from_ref(&r.user_public_key)));
        assert!(decode_jwt(&a.account_jwt()).unwrap()["nats"].get("revocations").is_none());
        assert!(!a.revise_revocations(&[], std::slice::from_ref(&r.user_public_key)));
    }

    #[test]
    fn the_authority_survives_a_save_and_load_owner_only() {
        let dir = std::env::temp_dir().join(format!("identity-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("authority.json");
        let mut a = Authority::generate();
        a.revise_revocations(&["UABC".to_owned()], &[]);
        a.save(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let b = Authority::load(&path).unwrap();
        assert_eq!(b.account_public_key(), a.account_public_key());
        assert_eq!(b.revocations(), a.revocations());
        assert!(!format!("{b:?}").contains(&a.account_seed), "Debug shows no seed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_server_config_names_the_operator_the_system_account_and_a_full_resolver() {
        let a = Authority::generate();
        let config = a.server_config(Path::new("/var/lib/crmsync/jwt"));
        assert!(config.contains(&format!("system_account: {}", a.system_account_public_key())));
        let operator = config.lines().find_map(|l| l.strip_prefix("operator: ")).unwrap();
        let operator = decode_jwt(operator.trim_matches('"')).unwrap();
        assert_eq!(operator["sub"], a.operator_public_key().as_str());
        assert!(config.contains("type: full") && config.contains("dir: \"/var/lib/crmsync/jwt\""));
        let sys = decode_jwt(&preload_of(&config, &a.system_account_public_key())).unwrap();
        assert_eq!(sys["sub"], a.system_account_public_key().as_str());
        let acc = decode_jwt(&preload_of(&config, &a.account_public_key())).unwrap();
        assert_eq!(acc["sub"], a.account_public_key().as_str());
    }

    /// The JWT preloaded for `account` in a server configuration.
    fn preload_of(config: &str, account: &str) -> String {
        let line = config.lines().find_map(|l| l.trim().strip_prefix(&format!("{account}: "))).unwrap();
        line.trim_matches('"').to_owned()
    }

    #[test]
    fn claims_update_answers_are_read() {
        assert!(check_claims_update_reply(br#"{"data":{"account":"A","code":200,"message":"jwt updated"}}"#).is_ok());
        assert!(check_claims_update_reply(br#"{"error":{"account":"A","code":500,"description":"x"}}"#).is_err());
        assert!(check_claims_update_reply(b"nope").is_err());
    }
}
