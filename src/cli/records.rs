//! Client commands: records, sets, remotes, status, online rebuild.

use std::time::Duration;

use serde_json::{Value as J, json};

use super::client::{Client, ClientError};
use super::{
    Command, MainCommand, OnOff, RecordCommand, RemoteCommand, SetCommand, SetSpecArgs, SubscriptionCommand,
    UserCommand,
};
use crmsync::model::Kind;

pub async fn run(client: &Client, command: Command, as_json: bool) -> Result<(), ClientError> {
    match command {
        Command::Status => {
            let status = client.get("/v1/status", &[]).await?;
            print_status(&status, as_json);
        }
        Command::Rebuild => rebuild(client, as_json).await?,
        Command::Sessions { remote, limit } => {
            let mut query = vec![("limit".to_owned(), limit.to_string())];
            query.extend(remote.map(|r| ("remote".to_owned(), r)));
            print_sessions(&client.get("/v1/sessions", &query).await?, as_json);
        }
        Command::Set(cmd) => set(client, cmd, as_json).await?,
        Command::Subscription(cmd) => subscription(client, cmd, as_json).await?,
        Command::Remote(cmd) => remote(client, cmd, as_json).await?,
        Command::Main(MainCommand::AcceptSyncs { state }) => {
            let body = json!({ "accept": state == OnOff::On });
            let answer = client.post("/v1/accept-syncs", &body).await?;
            if as_json {
                println!("{answer}");
            } else if answer["accepting_syncs"] == json!(true) {
                println!("the main accepts synchronizations: uploads are merged");
            } else {
                println!("the main does not accept synchronizations: uploads wait in CRM_UP until `accept-syncs on`");
            }
        }
        Command::Contact(cmd) => record(client, Kind::Contact, cmd, as_json).await?,
        Command::Company(cmd) => record(client, Kind::Company, cmd, as_json).await?,
        Command::Group(cmd) => record(client, Kind::Group, cmd, as_json).await?,
        Command::Membership(cmd) => record(client, Kind::Membership, cmd, as_json).await?,
        Command::Note(cmd) => record(client, Kind::Note, cmd, as_json).await?,
        Command::History(cmd) => record(client, Kind::History, cmd, as_json).await?,
        Command::Activity(cmd) => record(client, Kind::Activity, cmd, as_json).await?,
        Command::User(UserCommand::Record(cmd)) => record(client, Kind::User, cmd, as_json).await?,
        Command::User(UserCommand::Token { user }) => {
            let answer = client.post(&format!("/v1/users/{user}/tokens"), &json!({})).await?;
            if as_json {
                println!("{answer}");
            } else {
                println!("{}", answer["token"].as_str().unwrap_or_default());
                let id = answer["token_id"].as_str().unwrap_or_default();
                eprintln!("a new API token of {user} (id {id}); it is not shown again");
            }
        }
        Command::User(UserCommand::Tokens { user }) => {
            let answer = client.get(&format!("/v1/users/{user}/tokens"), &[]).await?;
            if as_json {
                println!("{answer}");
            } else {
                let ids = answer["token_ids"].as_array().cloned().unwrap_or_default();
                for id in &ids {
                    println!("{}", id.as_str().unwrap_or_default());
                }
                if ids.is_empty() {
                    println!("{user} has no API token");
                }
            }
        }
        Command::User(UserCommand::RevokeToken { user, token_id }) => {
            let answer = client.delete(&format!("/v1/users/{user}/tokens/{token_id}")).await?;
            if as_json {
                println!("{answer}");
            } else {
                println!("the API token {token_id} of {user} is revoked");
            }
        }
        Command::User(UserCommand::RevokeTokens { user }) => {
            let answer = client.delete(&format!("/v1/users/{user}/tokens")).await?;
            if as_json {
                println!("{answer}");
            } else {
                println!("every API token of {user} is revoked");
            }
        }
        Command::Team(cmd) => record(client, Kind::Team, cmd, as_json).await?,
        other => unreachable!("{other:?} runs locally, not through the API"),
    }
    Ok(())
}

async fn set(client: &Client, cmd: SetCommand, as_json: bool) -> Result<(), ClientError> {
    match cmd {
        SetCommand::Create { name, spec } => {
            let mut body = spec_body(&spec);
            body["name"] = json!(name);
            let set = client.post("/v1/sets", &body).await?;
            print_record(Kind::Set, &set, as_json);
        }
        SetCommand::Edit { name, spec, no_query } => {
            let mut body = spec_body(&spec);
            if no_query {
                body["query"] = J::Null;
            }
            print_record(Kind::Set, &client.patch(&format!("/v1/sets/{name}"), &body).await?, as_json);
        }
        SetCommand::Copy { name, new_name } => {
            let set = client.post(&format!("/v1/sets/{name}/copy"), &json!({ "name": new_name })).await?;
            print_record(Kind::Set, &set, as_json);
        }
        SetCommand::Delete { name } => {
            delete(client, &format!("/v1/sets/{name}"), &format!("set {name}"), as_json).await?
        }
        SetCommand::Preview { name, limit } => {
            let p = client.get(&format!("/v1/sets/{name}/preview"), &[("limit".into(), limit.to_string())]).await?;
            if as_json {
                println!("{p}");
            } else {
                println!("set {name} holds {} contacts", p["contacts"]);
                print_list(Kind::Contact, &json!({ "items": p["items"] }), false);
            }
        }
        SetCommand::List { page } => print_list(Kind::Set, &client.get("/v1/sets", &page.query()).await?, as_json),
        SetCommand::Show { name } => {
            print_record(Kind::Set, &client.get(&format!("/v1/sets/{name}"), &[]).await?, as_json)
        }
    }
    Ok(())
}

async fn subscription(client: &Client, cmd: SubscriptionCommand, as_json: bool) -> Result<(), ClientError> {
    let (remote, body) = match cmd {
        SubscriptionCommand::Add { remote, contacts } => (remote, Some(json!({ "add": contacts }))),
        SubscriptionCommand::Remove { remote, contacts } => (remote, Some(json!({ "remove": contacts }))),
        SubscriptionCommand::List { remote } => (remote, None),
    };
    let path = format!("/v1/remotes/{remote}/subscriptions");
    let out = match body {
        Some(body) => client.post(&path, &body).await?,
        None => client.get(&path, &[]).await?,
    };
    if as_json {
        println!("{out}");
    } else {
        let contacts = out["contacts"].as_array().cloned().unwrap_or_default();
        println!("remote {remote} subscribes {} contacts", contacts.len());
        for c in contacts {
            println!("  {}", scalar(&c));
        }
    }
    Ok(())
}

async fn remote(client: &Client, cmd: RemoteCommand, as_json: bool) -> Result<(), ClientError> {
    match cmd {
        RemoteCommand::Create { name, set, expires_days, out, nats_url } => {
            let body = json!({ "name": name, "set": set, "expires_days": expires_days, "nats_url": nats_url });
            let bundle = client.post("/v1/remotes", &body).await?;
            let path = write_bundle(&name, &bundle, out, "registered")?;
            if as_json {
                println!("{}", json!({ "bundle": path, "remote": bundle }));
            } else {
                println!("remote {name} registered on set {set}; bundle written to {}", path.display());
                println!("at the remote site: crmsync remote init --bundle {} --data DIR", path.display());
            }
        }
        RemoteCommand::Recreate { name, out } => {
            let bundle = client.post(&format!("/v1/remotes/{name}/recreate"), &json!({})).await?;
            let path = write_bundle(&name, &bundle, out, "re-created")?;
            if as_json {
                println!("{}", json!({ "bundle": path, "remote": bundle }));
            } else {
                println!(
                    "remote {name} re-created; its old bundle no longer syncs; new bundle written to {}",
                    path.display()
                );
                println!("at the remote site: crmsync remote init --bundle {} --data NEW_DIR", path.display());
            }
        }
        RemoteCommand::List { page } => {
            print_list(Kind::Remote, &client.get("/v1/remotes", &page.query()).await?, as_json)
        }
        RemoteCommand::Show { name } => {
            print_record(Kind::Remote, &client.get(&format!("/v1/remotes/{name}"), &[]).await?, as_json)
        }
        RemoteCommand::Halt { name } => {
            print_record(Kind::Remote, &client.post(&format!("/v1/remotes/{name}/halt"), &json!({})).await?, as_json)
        }
        RemoteCommand::Resume { name } => {
            print_record(Kind::Remote, &client.post(&format!("/v1/remotes/{name}/resume"), &json!({})).await?, as_json)
        }
        RemoteCommand::Delete { name } => {
            delete(client, &format!("/v1/remotes/{name}"), &format!("remote {name}"), as_json).await?
        }
        other => unreachable!("{other:?} runs locally, not through the API"),
    }
    Ok(())
}

/// Writes a bundle the main answered with (0600), to `out` or `NAME.bundle.json`.
fn write_bundle(
    name: &str,
    bundle: &J,
    out: Option<std::path::PathBuf>,
    done: &str,
) -> Result<std::path::PathBuf, ClientError> {
    let path = out.unwrap_or_else(|| format!("{name}.bundle.json").into());
    let text = serde_json::to_string_pretty(bundle).unwrap_or_default();
    crmsync::files::write_private(&path, text.as_bytes()).map_err(|e| ClientError::Api {
        status: 0,
        message: format!("the remote {name} is {done}, but its bundle could not be written to {}: {e}", path.display()),
    })?;
    Ok(path)
}

/// The JSON body of a set's definition: only what was given.
fn spec_body(spec: &SetSpecArgs) -> J {
    let mut body = json!({});
    if spec.all {
        body["all"] = json!(true);
    }
    if !spec.users.is_empty() {
        body["users"] = json!(spec.users);
    }
    if let Some(q) = &spec.query {
        body["query"] = json!(q);
    }
    if let Some(d) = &spec.description {
        body["description"] = json!(d);
    }
    body
}

fn usage(message: String) -> ClientError {
    ClientError::Usage(message)
}

/// Turns `FIELD=VALUE` pairs into a JSON body, typed by the kind's fields (see
/// [`crmsync::assign`]).
pub fn pairs_to_json(kind: Kind, pairs: &[String], base: Option<&str>) -> Result<J, ClientError> {
    crmsync::assign::parse_assignments(kind, pairs, base).map_err(usage)
}

async fn record(client: &Client, kind: Kind, cmd: RecordCommand, as_json: bool) -> Result<(), ClientError> {
    let base = format!("/v1/{}", kind.plural());
    match cmd {
        RecordCommand::Add { fields, from_json } => {
            let body = pairs_to_json(kind, &fields, from_json.as_deref())?;
            print_record(kind, &client.post(&base, &body).await?, as_json);
        }
        RecordCommand::Edit { id, fields, from_json } => {
            let body = pairs_to_json(kind, &fields, from_json.as_deref())?;
            print_record(kind, &client.patch(&format!("{base}/{id}"), &body).await?, as_json);
        }
        RecordCommand::Show { id } => print_record(kind, &client.get(&format!("{base}/{id}"), &[]).await?, as_json),
        RecordCommand::List { filters, limit, after } => {
            let mut query: Vec<(String, String)> = Vec::new();
            for f in &filters {
                let Some((k, v)) = f.split_once('=') else {
                    return Err(usage(format!("filter {f:?} is not FIELD=VALUE")));
                };
                query.push((k.to_owned(), v.to_owned()));
            }
            query.push(("limit".into(), limit.to_string()));
            if let Some(after) = after {
                query.push(("after".into(), after));
            }
            print_list(kind, &client.get(&base, &query).await?, as_json);
        }
        RecordCommand::Delete { id } => {
            delete(client, &format!("{base}/{id}"), &format!("{kind} {id}"), as_json).await?
        }
    }
    Ok(())
}

/// Deletes what `path` names; `what` says it in the line printed.
async fn delete(client: &Client, path: &str, what: &str, as_json: bool) -> Result<(), ClientError> {
    let out = client.delete(path).await?;
    if as_json {
        println!("{out}");
    } else {
        println!("deleted {what}");
    }
    Ok(())
}

fn scalar(v: &J) -> String {
    match v {
        J::String(s) => s.clone(),
        J::Array(items) => items.iter().map(scalar).collect::<Vec<_>>().join(","),
        J::Object(m) => m.iter().map(|(k, v)| format!("{k}={}", scalar(v))).collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    }
}

fn print_record(kind: Kind, record: &J, as_json: bool) {
    if as_json {
        println!("{record}");
        return;
    }
    let Some(map) = record.as_object() else {
        println!("{record}");
        return;
    };
    println!("{kind} {}", map.get("id").map(scalar).unwrap_or_default());
    let width = map.keys().map(String::len).max().unwrap_or(0);
    for (k, v) in map {
        if k != "id" {
            println!("  {k:width$}  {}", scalar(v));
        }
    }
}

/// One line that says which record this is.
fn summary(kind: Kind, r: &J) -> String {
    let f = |name: &str| r.get(name).map(scalar).unwrap_or_default();
    let s = match kind {
        Kind::Contact => format!("{} {}  {}, {}", f("first_name"), f("last_name"), f("city"), f("state")),
        Kind::Note => f("text").chars().take(60).collect(),
        Kind::Membership => format!("{} in {}", f("contact_id"), f("group_id")),
        Kind::History | Kind::Activity => format!("{} {}", f("type"), f("regarding")),
        Kind::Set => {
            if f("all") == "true" {
                "all records".into()
            } else {
                f("users")
            }
        }
        Kind::Remote => format!(
            "set {}, {}, last sync {}, expires {}, backlog {}, uploads waiting {}, created {}",
            f("set"),
            f("state"),
            time(r.get("last_sync_ms")),
            r.get("expires_ms").and_then(J::as_u64).map_or_else(|| "-".into(), crmsync::date::utc_day),
            f("backlog"),
            f("uploads_waiting"),
            time(r.get("created_ms")),
        ),
        _ => f("name"),
    };
    s.trim().to_owned()
}

/// A time in milliseconds as `YYYY-MM-DD HH:MM` (UTC), `-` when there is none.
fn time(ms: Option<&J>) -> String {
    ms.and_then(J::as_u64).map_or_else(|| "-".into(), |ms| format!("{} UTC", crmsync::date::utc_minute(ms)))
}

/// Sync sessions, one line each.
pub fn print_sessions(sessions: &J, as_json: bool) {
    if as_json {
        println!("{sessions}");
        return;
    }
    let list = sessions.get("sessions").and_then(J::as_array).cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no sync sessions");
    }
    for s in &list {
        let seconds = s["ended_ms"].as_u64().unwrap_or(0).saturating_sub(s["started_ms"].as_u64().unwrap_or(0)) / 1000;
        println!(
            "{}  {:12}  {:>4} s  received {}, sent {}, refused {}, conflicts {}  ({})",
            time(s.get("started_ms")),
            scalar(&s["remote"]),
            seconds,
            scalar(&s["received"]),
            scalar(&s["sent"]),
            scalar(&s["refused"]),
            scalar(&s["conflicts"]),
            scalar(&s["mode"]),
        );
    }
}

fn print_list(kind: Kind, page: &J, as_json: bool) {
    if as_json {
        println!("{page}");
        return;
    }
    let items = page.get("items").and_then(J::as_array).cloned().unwrap_or_default();
    for item in &items {
        println!("{:28}  {}", item.get("id").map(scalar).unwrap_or_default(), summary(kind, item));
    }
    match page.get("next").and_then(J::as_str) {
        Some(next) => println!("(more: --after {next})"),
        None if items.is_empty() => println!("no {}", kind.plural()),
        None => {}
    }
}

fn print_connection(nats: J) {
    let connection = match nats.get("offline_since_ms").and_then(J::as_u64) {
        _ if nats.get("connected") == Some(&J::Bool(true)) => "connected".to_owned(),
        Some(since) => {
            format!("not connected for {} s", crmsync::hlc::wall_ms().saturating_sub(since) / 1000)
        }
        None => "not connected".to_owned(),
    };
    println!("nats      {} ({connection})", nats.get("url").map(scalar).unwrap_or_default());
}

fn print_status(s: &J, as_json: bool) {
    if as_json {
        println!("{s}");
        return;
    }
    let f = |k: &str| s.get(k).map(scalar).unwrap_or_default();
    println!("role      {}", f("role"));
    println!("database  {}", f("database_id"));
    if f("role") == "remote" {
        println!("remote    {} (set {})", f("remote"), f("set"));
    }
    print_connection(s.get("nats").cloned().unwrap_or_default());
    if let Some(counts) = s.get("counts").and_then(J::as_object) {
        let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("records   {}", parts.join(", "));
    }
    println!("applied   {} (backlog {})", f("applied"), f("backlog"));
    if f("role") == "main" {
        println!("outbox    {}", f("outbox"));
        println!("uploads   {} waiting in CRM_UP, {} parked", f("uploads_waiting"), f("uploads_parked"));
    } else if let Some(up) = s.get("uploads") {
        let error = up.get("error").and_then(J::as_str).map(|e| format!(" (failing: {e})")).unwrap_or_default();
        println!("uploads   {} waiting{error}", up.get("waiting").map(scalar).unwrap_or_default());
    }
    if let Some(sync) = s.get("sync") {
        let next = sync.get("next_ms").filter(|n| !n.is_null()).map(|n| format!(", next {}", time(Some(n))));
        println!("sync      {}{}", scalar(&sync["mode"]), next.unwrap_or_default());
        println!("last sync {}, expires {}", time(s.get("last_sync_ms")), time(s.get("expires_ms")));
    }
    print_status_logs(s);
}

/// The status's notices, refusals, quarantined messages, error and rebuild progress.
fn print_status_logs(s: &J) {
    let f = |k: &str| s.get(k).map(scalar).unwrap_or_default();
    if let Some(notice) = s.get("notice").and_then(J::as_str) {
        println!("NOTICE    {notice}");
    }
    if let Some(file) = s.pointer("/expired/export").and_then(J::as_str) {
        println!("          the edits made here and not uploaded are in {file}");
    }
    println!("refused   {}", f("refused"));
    if let Some(log) = s.get("sync_log").and_then(J::as_array) {
        for e in log {
            println!(
                "  {} {} {}: {}",
                scalar(&e["remote"]),
                scalar(&e["kind"]),
                scalar(&e["id"]),
                scalar(&e["reason"])
            );
        }
    }
    println!("quarantined {}", f("quarantined"));
    if let Some(q) = s.get("quarantine").and_then(J::as_array) {
        for item in q {
            println!("  seq {}  {}  {}", scalar(&item["seq"]), scalar(&item["subject"]), scalar(&item["error"]));
        }
    }
    if let Some(err) = s.get("error").and_then(J::as_str) {
        println!("ERROR     {err}");
    }
    if let Some(r) = s.get("rebuilding").filter(|r| !r.is_null()) {
        println!("rebuilding {}/{}", scalar(&r["done"]), scalar(&r["total"]));
    }
}

async fn rebuild(client: &Client, as_json: bool) -> Result<(), ClientError> {
    let started = client.post("/v1/rebuild", &json!({})).await?;
    let total = started.pointer("/rebuilding/total").and_then(J::as_u64).unwrap_or(0);
    let bar = if as_json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} records  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = client.get("/v1/status", &[]).await?;
        if let Some(err) = status.get("error").and_then(J::as_str) {
            bar.abandon();
            return Err(ClientError::Api { status: 0, message: format!("the rebuild stopped: {err}") });
        }
        match status.get("rebuilding").filter(|r| !r.is_null()) {
            Some(r) => bar.set_position(r["done"].as_u64().unwrap_or(0)),
            None => {
                bar.finish_and_clear();
                let summary = status.get("last_rebuild").cloned().unwrap_or(J::Null);
                if as_json {
                    println!("{summary}");
                } else {
                    println!(
                        "rebuilt {} records in {:.2} s",
                        summary["records"].as_u64().unwrap_or(0),
                        summary["seconds"].as_f64().unwrap_or(0.0)
                    );
                }
                return Ok(());
            }
        }
    }
}
