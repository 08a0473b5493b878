//! Sync sets and subscription lists at the main: create, edit, copy, delete, preview; add to
//! and remove from a remote's subscription list. All of them are events (set and remote
//! records), so the router re-evaluates what moves in the projector, in commit order.

use serde_json::{Value as J, json};

use super::{Decision, Main, SetRequest};
use crate::error::ServiceError;
use crate::model::Record;
use crate::model::{self, Fields, Kind, Value};
use crate::names;
use crate::routing::{RoutingConfig, SetSpec, TargetDef};
use crate::wire::Target;

impl Main {
    /// The routing configuration as the projection holds it now.
    fn routing_config(&self) -> Result<RoutingConfig, ServiceError> {
        Ok(super::projector::RoutingState::load(self.store())?.config)
    }

    /// Checks a set's fields as a whole ([`SetSpec::check`]), and that its users exist.
    fn check_set(&self, fields: &Fields) -> Result<(), ServiceError> {
        let spec = SetSpec::check(fields).map_err(|e| ServiceError::Invalid(e.to_string()))?;
        for user in &spec.users {
            if self.store().get(Kind::User, user)?.is_none() {
                return Err(ServiceError::MissingRef { field: "users".into(), kind: Kind::User, id: user.clone() });
            }
        }
        Ok(())
    }

    /// Creates a sync set. Sets are events too, so a rebuilt main has them.
    pub async fn create_set(&self, req: &SetRequest) -> Result<Record, ServiceError> {
        names::check("set name", &req.name)?;
        let mut body = serde_json::Map::new();
        if req.all {
            body.insert("all".into(), J::Bool(true));
        }
        if !req.users.is_empty() {
            body.insert("users".into(), json!(req.users));
        }
        if let Some(q) = &req.query {
            body.insert("query".into(), J::String(q.clone()));
        }
        if let Some(d) = &req.description {
            body.insert("description".into(), J::String(d.clone()));
        }
        let patch = model::parse_input(Kind::Set, &J::Object(body), true)?.patch;
        let mut fields = Fields::new();
        crate::merge::apply_patch(&mut fields, &patch, self.inner.clock.now());
        self.check_set(&fields)?;
        self.create_config(Kind::Set, &req.name, fields).await
    }

    async fn create_config(&self, kind: Kind, id: &str, fields: Fields) -> Result<Record, ServiceError> {
        let stored = self
            .commit(kind, id, |current| {
                if current.is_some() {
                    return Err(ServiceError::Exists { kind, id: id.to_owned() });
                }
                Ok(Decision::Upsert(fields.clone()))
            })
            .await?;
        stored.ok_or_else(|| ServiceError::Internal(format!("the new {kind} {id} is not in the projection")))
    }

    /// Changes a set's users, query, `all` or description; what it then gains or loses moves.
    pub async fn edit_set(&self, name: &str, body: &J) -> Result<Record, ServiceError> {
        let input = model::parse_input(Kind::Set, body, false)?;
        let stamp = self.inner.clock.now();
        let stored = self
            .commit(Kind::Set, name, |current| {
                let current = current.ok_or_else(|| ServiceError::NotFound { kind: Kind::Set, id: name.to_owned() })?;
                let mut fields = current.fields.clone();
                let patch = SetSpec::edit(input.patch.clone());
                if !crate::merge::apply_patch(&mut fields, &patch, stamp) {
                    return Ok(Decision::Unchanged);
                }
                self.check_set(&fields)?;
                Ok(Decision::Upsert(fields))
            })
            .await?;
        stored.ok_or_else(|| ServiceError::NotFound { kind: Kind::Set, id: name.to_owned() })
    }

    /// A new set with the same users and query as `from`.
    pub async fn copy_set(&self, from: &str, to: &str) -> Result<Record, ServiceError> {
        names::check("set name", to)?;
        let source = self
            .store()
            .get(Kind::Set, from)?
            .ok_or_else(|| ServiceError::NotFound { kind: Kind::Set, id: from.to_owned() })?;
        let stamp = self.inner.clock.now();
        let fields: Fields = source
            .fields
            .into_iter()
            .map(|(k, mut f)| {
                f.stamp = stamp;
                (k, f)
            })
            .collect();
        self.create_config(Kind::Set, to, fields).await
    }

    /// The remotes that use a set.
    pub fn remotes_of(&self, set: &str) -> Result<Vec<String>, ServiceError> {
        let mut out = Vec::new();
        self.store().for_each(Kind::Remote, |name, stored| {
            if model::text(&stored.fields, "set") == Some(set) {
                out.push(name.to_owned());
            }
        })?;
        Ok(out)
    }

    /// Deletes a set no remote uses, and purges its subjects from `CRM_SYNC`.
    pub async fn delete_set(&self, name: &str) -> Result<(), ServiceError> {
        let users = self.remotes_of(name)?;
        if !users.is_empty() {
            return Err(ServiceError::Conflict(format!(
                "set {name} is used by remote{} {}: move them to another set (re-create them) before deleting it",
                if users.len() == 1 { "" } else { "s" },
                users.join(", ")
            )));
        }
        self.commit(Kind::Set, name, |current| match current {
            Some(_) => Ok(Decision::Delete),
            None => Err(ServiceError::NotFound { kind: Kind::Set, id: name.to_owned() }),
        })
        .await?;
        self.inner.nats.purge_target(&Target::Set(name.to_owned())).await?;
        Ok(())
    }

    fn target_def(&self, target: &Target) -> Result<Option<TargetDef>, ServiceError> {
        Ok(self.routing_config()?.target_defs().into_iter().find(|d| &d.target == target))
    }

    /// How many contacts a set holds now, and the first `limit` of them.
    pub fn preview_set(&self, name: &str, limit: usize) -> Result<J, ServiceError> {
        let def = self
            .target_def(&Target::Set(name.to_owned()))?
            .ok_or_else(|| ServiceError::NotFound { kind: Kind::Set, id: name.to_owned() })?;
        let mut count = 0u64;
        let mut sample = Vec::new();
        self.store().for_each(Kind::Contact, |id, stored| {
            if def.holds(Kind::Contact, id, &stored.fields) {
                count += 1;
                if sample.len() < limit {
                    sample.push(model::to_json(id, stored.version, &stored.fields));
                }
            }
        })?;
        Ok(json!({ "set": name, "contacts": count, "items": sample }))
    }

    /// A remote's subscription list.
    pub fn subscriptions(&self, remote: &str) -> Result<Vec<String>, ServiceError> {
        let stored = self
            .store()
            .get(Kind::Remote, remote)?
            .ok_or_else(|| ServiceError::NotFound { kind: Kind::Remote, id: remote.to_owned() })?;
        Ok(model::names(&stored.fields, "subscriptions").to_vec())
    }

    /// Adds contacts to a remote's subscription list: only contacts its users may access.
    pub async fn subscribe(&self, remote: &str, contacts: &[String]) -> Result<Vec<String>, ServiceError> {
        let def = self
            .target_def(&Target::Subscriptions(remote.to_owned()))?
            .ok_or_else(|| ServiceError::NotFound { kind: Kind::Remote, id: remote.to_owned() })?;
        for id in contacts {
            names::check("contact id", id)?;
            let contact = self.store().get(Kind::Contact, id)?.ok_or_else(|| ServiceError::MissingRef {
                field: "contacts".into(),
                kind: Kind::Contact,
                id: id.clone(),
            })?;
            if !def.could_list(&contact.fields) {
                return Err(ServiceError::Invalid(format!(
                    "contact {id} is not accessible to the users of remote {remote}'s set, so it cannot be subscribed there"
                )));
            }
        }
        self.change_subscriptions(remote, |list| {
            for id in contacts {
                if !list.contains(id) {
                    list.push(id.clone());
                }
            }
            Ok(())
        })
        .await
    }

    /// Removes contacts from a remote's subscription list: only contacts added through it.
    pub async fn unsubscribe(&self, remote: &str, contacts: &[String]) -> Result<Vec<String>, ServiceError> {
        self.change_subscriptions(remote, |list| {
            for id in contacts {
                let Some(at) = list.iter().position(|c| c == id) else {
                    return Err(ServiceError::Invalid(format!(
                        "contact {id} is not in remote {remote}'s subscription list; only contacts added through the list can be removed through it"
                    )));
                };
                list.remove(at);
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn change_subscriptions(
        &self,
        remote: &str,
        change: impl Fn(&mut Vec<String>) -> Result<(), ServiceError>,
    ) -> Result<Vec<String>, ServiceError> {
        let stamp = self.inner.clock.now();
        let stored = self
            .commit(Kind::Remote, remote, |current| {
                let current =
                    current.ok_or_else(|| ServiceError::NotFound { kind: Kind::Remote, id: remote.to_owned() })?;
                let mut list = model::names(&current.fields, "subscriptions").to_vec();
                change(&mut list)?;
                if list.len() > model::MAX_NAMES {
                    return Err(ServiceError::Invalid(format!(
                        "a subscription list holds at most {} contacts",
                        model::MAX_NAMES
                    )));
                }
                let mut fields = current.fields.clone();
                if !crate::merge::apply_patch(&mut fields, &vec![("subscriptions".into(), Value::List(list))], stamp) {
                    return Ok(Decision::Unchanged);
                }
                Ok(Decision::Upsert(fields))
            })
            .await?;
        let stored = stored.ok_or_else(|| ServiceError::NotFound { kind: Kind::Remote, id: remote.to_owned() })?;
        Ok(model::names(&stored.fields, "subscriptions").to_vec())
    }
}
