//! Each remote's own NATS credentials, issued and revoked by the main.
//!
//! When the main is given the authority file (`--authority`, made by `crmsync nats-auth`), it
//! connects with credentials of its own, signs one user JWT per remote into the remote's
//! bundle, and keeps the public key of that user in the remote's record (`nats_user`). Deleting
//! or re-creating a remote revokes its user: the account JWT is re-issued with the key in its
//! revocations and pushed to the server through the system account, which closes the remote's
//! connections at once and refuses its credentials from then on, without a restart. Halting
//! and expiring revoke them the same way; resuming takes the revocation back, so the halted
//! remote's bundle works again (a re-created or deleted remote's user is never reinstated: no
//! record names it any more).
//! Without an authority (a server without authentication) no credentials are issued.

use std::path::PathBuf;
use std::sync::Mutex;

use super::{Decision, Main};
use crate::error::ServiceError;
use crate::identity::Authority;
use crate::model::{self, Fields, Kind, Value};
use crate::transport::{Login, Nats};

/// The main's authority over NATS identities, and its system-account connection.
pub(super) struct Credentials {
    authority: Mutex<Authority>,
    path: PathBuf,
    system: Nats,
}

impl Credentials {
    /// Reads the authority file and connects to the system account; pushes the account JWT
    /// with every revocation made so far (a server set up from an older configuration learns
    /// them).
    pub(super) async fn open(path: PathBuf, url: &str, base: Login) -> anyhow::Result<(Credentials, Login)> {
        let authority = Authority::load(&path).map_err(|e| {
            anyhow::anyhow!("cannot read the NATS authority: {e}; make it with `crmsync nats-auth --authority FILE`")
        })?;
        let system = Login { creds: Some(authority.system_creds()), ..base.clone() };
        let system = Nats::connect_as(url, "crmsync-main-system", &system).await?;
        system.push_account_jwt(&authority.account_jwt()).await?;
        let login = Login { creds: Some(authority.main_creds()), ..base };
        Ok((Credentials { authority: Mutex::new(authority), path, system }, login))
    }

    /// New credentials for a remote: the `.creds` text and its user's public key.
    fn issue(&self, remote: &str, consumer: &str, set: &str) -> Result<(String, String), ServiceError> {
        let issued = self
            .authority
            .lock()
            .unwrap()
            .remote_creds(remote, consumer, set)
            .map_err(|e| ServiceError::Invalid(e.to_string()))?;
        Ok((issued.creds, issued.user_public_key))
    }

    /// Revokes users and reinstates others: saved first (every later account JWT carries the
    /// revocations), then pushed, when anything changed.
    async fn revise(&self, revoke: &[String], reinstate: &[String]) -> Result<(), ServiceError> {
        let jwt = {
            let mut authority = self.authority.lock().unwrap();
            if !authority.revise_revocations(revoke, reinstate) {
                return Ok(());
            }
            authority
                .save(&self.path)
                .map_err(|e| ServiceError::Internal(format!("saving the NATS authority: {e}")))?;
            authority.account_jwt()
        };
        self.system.push_account_jwt(&jwt).await?;
        tracing::info!(revoked = revoke.len(), reinstated = reinstate.len(), "revised NATS credentials");
        Ok(())
    }
}

impl Main {
    /// Credentials for a remote, if this main issues them: the `.creds` text, and the field
    /// naming its user for the remote's record.
    pub(super) fn issue_creds(
        &self,
        remote: &str,
        consumer: &str,
        set: &str,
    ) -> Result<Option<(String, String)>, ServiceError> {
        match &self.inner.credentials {
            Some(credentials) => Ok(Some(credentials.issue(remote, consumer, set)?)),
            None => Ok(None),
        }
    }

    /// Revokes the NATS user a remote's record names, if any: its connections close, its
    /// credentials are refused.
    pub(super) async fn revoke_creds(&self, record: &Fields) -> Result<(), ServiceError> {
        self.revise_creds(record, true).await
    }

    /// Revokes (`true`) or reinstates (`false`) the NATS user a remote's record names, if any.
    /// A halted remote's credentials are revoked and reinstated when it is resumed: the same
    /// bundle works again.
    pub(super) async fn revise_creds(&self, record: &Fields, revoke: bool) -> Result<(), ServiceError> {
        match (&self.inner.credentials, model::text(record, NATS_USER)) {
            (Some(credentials), Some(user)) => {
                let user = [user.to_owned()];
                let (revoked, reinstated): (&[String], &[String]) = if revoke { (&user, &[]) } else { (&[], &user) };
                credentials.revise(revoked, reinstated).await
            }
            _ => Ok(()),
        }
    }

    /// Brings the server's revocations in line with the remotes' records, at start (a main
    /// stopped between halting a remote and revoking its user, say): the users of halted and
    /// expired remotes are revoked, those of the others are not.
    pub(super) async fn reconcile_creds(&self) -> Result<(), ServiceError> {
        let Some(credentials) = &self.inner.credentials else { return Ok(()) };
        let (mut revoke, mut reinstate) = (Vec::new(), Vec::new());
        self.inner.store.for_each(Kind::Remote, |_, record| {
            if let Some(user) = model::text(&record.fields, NATS_USER) {
                let cut_off = model::remote_halted(&record.fields) || model::remote_expired(&record.fields).is_some();
                if cut_off { &mut revoke } else { &mut reinstate }.push(user.to_owned());
            }
        })?;
        credentials.revise(&revoke, &reinstate).await
    }
}

/// The field of a remote's record that names its NATS user (a public key).
pub(super) const NATS_USER: &str = "nats_user";

/// The file a main writes its first administrator's token to, in its data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The id of the administrator a main makes on its first start.
pub const ADMIN_USER: &str = "admin";

impl Main {
    /// A new API token for `user`: its hash joins the user's `tokens` (routed with the user, so
    /// the token works at the remotes too); the token itself is returned once, never stored.
    pub async fn new_token(&self, user: &str) -> Result<String, ServiceError> {
        crate::names::check("user id", user)?;
        let (token, hash) = crate::identity::new_token();
        let stamp = self.inner.clock.now();
        self.commit(Kind::User, user, |current| {
            let current = current.ok_or_else(|| ServiceError::NotFound { kind: Kind::User, id: user.to_owned() })?;
            let mut tokens = model::names(&current.fields, model::TOKENS).to_vec();
            tokens.push(hash.clone());
            let mut fields = current.fields.clone();
            crate::merge::apply_patch(&mut fields, &vec![(model::TOKENS.to_owned(), Value::List(tokens))], stamp);
            Ok(Decision::Upsert(fields))
        })
        .await?;
        Ok(token)
    }

    /// The ids of `user`'s API tokens ([`crate::identity::token_id`]).
    pub fn token_ids(&self, user: &str) -> Result<Vec<String>, ServiceError> {
        crate::names::check("user id", user)?;
        let record = self
            .inner
            .store
            .get(Kind::User, user)?
            .ok_or_else(|| ServiceError::NotFound { kind: Kind::User, id: user.to_owned() })?;
        Ok(model::names(&record.fields, model::TOKENS)
            .iter()
            .map(|h| crate::identity::token_id(h).to_owned())
            .collect())
    }

    /// Revokes the one API token of `user` whose id is `token_id`, at the main at once and at
    /// each remote once the user's new state reaches it.
    pub async fn revoke_token(&self, user: &str, token_id: &str) -> Result<(), ServiceError> {
        crate::names::check("user id", user)?;
        let stamp = self.inner.clock.now();
        self.commit(Kind::User, user, |current| {
            let current = current.ok_or_else(|| ServiceError::NotFound { kind: Kind::User, id: user.to_owned() })?;
            let tokens = model::names(&current.fields, model::TOKENS);
            let kept: Vec<String> =
                tokens.iter().filter(|h| crate::identity::token_id(h) != token_id).cloned().collect();
            if kept.len() == tokens.len() || token_id.len() != crate::identity::TOKEN_ID_LEN {
                return Err(ServiceError::Missing(format!(
                    "user {user} has no API token with id {token_id:?}; `crmsync user tokens {user}` lists their ids"
                )));
            }
            let mut fields = current.fields.clone();
            crate::merge::apply_patch(&mut fields, &vec![(model::TOKENS.to_owned(), Value::List(kept))], stamp);
            Ok(Decision::Upsert(fields))
        })
        .await?;
        Ok(())
    }

    /// Revokes every API token of `user`, at the main at once and at each remote once the
    /// user's new state reaches it.
    pub async fn revoke_tokens(&self, user: &str) -> Result<(), ServiceError> {
        crate::names::check("user id", user)?;
        let stamp = self.inner.clock.now();
        self.commit(Kind::User, user, |current| {
            let current = current.ok_or_else(|| ServiceError::NotFound { kind: Kind::User, id: user.to_owned() })?;
            let mut fields = current.fields.clone();
            crate::merge::apply_patch(&mut fields, &vec![(model::TOKENS.to_owned(), Value::List(Vec::new()))], stamp);
            Ok(Decision::Upsert(fields))
        })
        .await?;
        Ok(())
    }

    /// On a main's first start (no `admin.token` in its data directory): the administrator
    /// `admin`, made if missing, and a token of theirs written there (0600). Returns the file
    /// when it was written.
    pub(super) async fn first_administrator(&self) -> anyhow::Result<Option<PathBuf>> {
        let file = self.inner.config.data_dir.join(ADMIN_TOKEN_FILE);
        if file.exists() {
            return Ok(None);
        }
        if self.inner.store.get(Kind::User, ADMIN_USER)?.is_none() {
            let body = serde_json::json!({ "id": ADMIN_USER, "name": "Administrator", "role": "administrator" });
            match self.create(Kind::User, &body).await {
                Ok(_) | Err(ServiceError::Exists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let token = self.new_token(ADMIN_USER).await?;
        crate::files::write_private(&file, format!("{token}\n").as_bytes())?;
        tracing::info!("the administrator's API token is in {}", file.display());
        Ok(Some(file))
    }
}
