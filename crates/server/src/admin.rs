//! matrix-media-repo's admin API (under `/_matrix/media/unstable/admin/` and
//! `/_matrix/media/unstable/io.t2bot.media/admin/`), and the Synapse admin calls the route table
//! sends here (`purge_media_cache`, `quarantine_media/{roomId}`).
//!
//! Who may call what is MMR's: repo admins (`admins`, the shared secret) everything; an admin of
//! the homeserver a request is for (asked of the homeserver's admin API, cached briefly) what
//! concerns that homeserver's media; an uploader the purge of their own media; everyone else 403.

use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use config::AdminApiKind;
use media::tasks::Task;
use moka::sync::Cache;
use serde_json::{Value, json};
use store::admin::{PurgeReport, Selection, StatsQuery};

use crate::SharedState;
use crate::auth::{User, is_valid_user_id, query_param, server_of, token};
use crate::error::ApiError;
use crate::extract::Ctx;

type ApiResult<T> = Result<T, ApiError>;

/// How long a homeserver's "is an admin" answer is believed.
const ADMIN_CHECK_TTL: Duration = Duration::from_secs(60);
/// How long a purge request waits for its task before answering with the task's id.
const PURGE_WAIT: Duration = Duration::from_secs(60);

/// The admin routes, relative to an admin prefix.
pub(crate) fn routes() -> axum::Router<SharedState> {
    axum::Router::new()
        .route("/purge/remote", post(purge_remote))
        .route("/purge_remote", post(purge_remote))
        .route("/purge/old", post(purge_old))
        .route("/purge/quarantined", post(purge_quarantined))
        .route("/purge/user/{user_id}", post(purge_user))
        .route("/purge/room/{room_id}", post(purge_room))
        .route("/purge/server/{server}", post(purge_server))
        .route("/purge/{server}/{media_id}", post(purge_one))
        .route("/quarantine/room/{room_id}", post(quarantine_room))
        .route("/quarantine/user/{user_id}", post(quarantine_user))
        .route("/quarantine/server/{server}", post(quarantine_server))
        .route("/quarantine/{server}/{media_id}", post(quarantine_one))
        .route("/unquarantine/{server}/{media_id}", post(unquarantine_one))
        .route("/datastores", get(datastores))
        .route("/datastores/{id}/size_estimate", get(size_estimate))
        .route("/datastores/{from}/transfer_to/{to}", post(transfer_to))
        .route("/federation/test/{server}", get(federation_test))
        .route("/usage/{server}", get(usage_server))
        .route("/usage/{server}/users", get(usage_users))
        .route("/usage/{server}/users-stats", get(users_stats))
        .route("/usage/{server}/uploads", get(usage_uploads))
        .route("/tasks/all", get(tasks_all))
        .route("/tasks/unfinished", get(tasks_unfinished))
        .route("/tasks/{id}", get(task_one))
        .route(
            "/media/{server}/{media_id}/attributes",
            get(attributes).post(set_attributes),
        )
        .route(
            "/media/{server}/{media_id}/attributes/set",
            post(set_attributes),
        )
        .route("/user/{user_id}/export", post(export_user))
        .route("/server/{server}/export", post(export_server))
        .route("/export/{export_id}/view", get(export_view))
        .route("/export/{export_id}/metadata", get(export_metadata))
        .route("/export/{export_id}/part/{part}", get(export_part))
        .route("/export/{export_id}", axum::routing::delete(export_delete))
        .route("/import", post(import_start))
        .route("/import/{import_id}/part", post(import_part))
        .route("/import/{import_id}/close", post(import_close))
}

/// The Synapse admin calls the route table sends here, relative to `/_matrix/client/{version}`.
pub(crate) fn synapse_routes() -> axum::Router<SharedState> {
    axum::Router::new()
        .route("/admin/purge_media_cache", post(purge_media_cache))
        .route("/admin/quarantine_media/{room_id}", post(quarantine_room))
}

/// "Is this token a homeserver admin's", per homeserver and token.
pub(crate) struct AdminChecks(Cache<(String, String), bool>);

impl AdminChecks {
    pub(crate) fn new() -> AdminChecks {
        AdminChecks(
            Cache::builder()
                .max_capacity(10_000)
                .time_to_live(ADMIN_CHECK_TTL)
                .build(),
        )
    }
}

/// An authenticated caller of the admin API.
pub(crate) struct Caller {
    ctx: Ctx,
    user: User,
    token: String,
}

impl FromRequestParts<SharedState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> ApiResult<Caller> {
        let ctx = Ctx::from_request_parts(parts, state).await?;
        let user = ctx.authenticate(state, parts, false).await?;
        let token = token(&parts.headers, parts.uri.query())?;
        Ok(Caller { ctx, user, token })
    }
}

impl Caller {
    fn require_repo_admin(&self) -> ApiResult<()> {
        if self.user.is_admin {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "Only the media repository's administrators may do this",
            ))
        }
    }

    /// Whether the caller administers the homeserver the request is for, as its admin API says.
    async fn is_local_admin(&self, state: &SharedState) -> ApiResult<bool> {
        let key = (self.ctx.hs.name.clone(), self.token.clone());
        if let Some(known) = state.admin_checks.0.get(&key) {
            return Ok(known);
        }
        // Asking about a user that need not exist: only an admin may ask about someone else.
        let probe = format!("@media.repo.admin.check:{}", self.ctx.hs.name);
        let probe =
            percent_encoding::utf8_percent_encode(&probe, percent_encoding::NON_ALPHANUMERIC);
        let path = match self.ctx.hs.admin_api_kind {
            AdminApiKind::Synapse => format!("/_synapse/admin/v1/whois/{probe}"),
            AdminApiKind::Dendrite | AdminApiKind::Matrix => {
                format!("/_matrix/client/v3/admin/whois/{probe}")
            }
        };
        let response = state
            .auth
            .homeserver(
                &self.ctx.config,
                &self.ctx.hs,
                outbound::Method::GET,
                &path,
                |r| r.bearer_auth(&self.token),
            )
            .await
            .map_err(|e| homeserver_failed(&self.ctx, &e.to_string()))?;
        let admin = match response.status().as_u16() {
            200 => true,
            401 | 403 => false,
            status => {
                return Err(homeserver_failed(
                    &self.ctx,
                    &format!("its admin API answered HTTP {status} to {path}"),
                ));
            }
        };
        state.admin_checks.0.insert(key, admin);
        Ok(admin)
    }

    /// Where the caller may act: `None` (every origin) for repo admins, the request's homeserver
    /// for its admins when `locals` allows them; else 403.
    async fn scope(&self, state: &SharedState, locals: bool) -> ApiResult<Option<String>> {
        if self.user.is_admin {
            return Ok(None);
        }
        if locals && self.is_local_admin(state).await? {
            return Ok(Some(self.ctx.hs.name.clone()));
        }
        Err(ApiError::forbidden(if locals {
            "Only the media repository's administrators, or this homeserver's, may do this"
        } else {
            "Only the media repository's administrators may do this"
        }))
    }

    /// [`Caller::scope`] for media of `origin`: a homeserver admin acts for their own only.
    async fn scope_for(
        &self,
        state: &SharedState,
        locals: bool,
        origin: &str,
    ) -> ApiResult<Option<String>> {
        match self.scope(state, locals).await? {
            Some(own) if !own.eq_ignore_ascii_case(origin) => Err(ApiError::forbidden(format!(
                "A homeserver's administrators act only for its media ({own}), not {origin}'s"
            ))),
            scope => Ok(scope),
        }
    }

    /// Whether quarantine is open to homeserver admins (`quarantine.allowLocalAdmins`).
    fn quarantine_locals(&self) -> bool {
        self.ctx.config.quarantine.allow_local_admins
    }
}

fn homeserver_failed(ctx: &Ctx, why: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "M_UNKNOWN",
        format!(
            "Cannot check with the homeserver {} whether you administer it: {why}",
            ctx.hs.name
        ),
    )
}

/// `before_ts` (ms), now when absent.
fn before_ts(query: Option<&str>) -> ApiResult<i64> {
    match query_param(query, "before_ts") {
        None => Ok(store::now_ms()),
        Some(v) => v
            .parse()
            .map_err(|_| ApiError::bad_request("`before_ts` must be a time in milliseconds")),
    }
}

/// Every value of a repeated query parameter.
fn query_all(query: Option<&str>, name: &str) -> Vec<String> {
    let Some(query) = query else {
        return Vec::new();
    };
    query
        .split('&')
        .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) == name)
        .filter_map(|pair| query_param(Some(pair), name))
        .collect()
}

fn valid_user(user_id: &str) -> ApiResult<()> {
    if is_valid_user_id(user_id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "`{user_id}` is not a Matrix user id (@localpart:server)"
        )))
    }
}

fn valid_server(server: &str) -> ApiResult<()> {
    if store::ids::is_valid_server_name(server) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "`{server}` is not a valid server name"
        )))
    }
}

/// A purge, run as a background task so that it finishes (and survives a restart) whatever
/// the client does; answered with its report, or with the task's id when it takes longer than
/// [`PURGE_WAIT`].
enum Purged {
    Done(PurgeReport),
    Running(i64),
}

async fn purge(
    state: &SharedState,
    selection: Selection,
    only_origin: Option<String>,
) -> ApiResult<Purged> {
    let id = state
        .media
        .start_task(&Task::Purge {
            selection,
            only_origin,
        })
        .await?;
    let row = state.media.wait_task(id, PURGE_WAIT).await?;
    match row {
        Some(r) if r.end_ts == 0 => Ok(Purged::Running(id)),
        Some(r) if r.error.is_empty() => Ok(Purged::Done(
            serde_json::from_str(&r.progress).unwrap_or_default(),
        )),
        Some(r) => Err(ApiError::internal(format!(
            "The purge (task {id}) failed: {}",
            r.error
        ))),
        None => Err(ApiError::internal(format!("Task {id} disappeared"))),
    }
}

/// MMR's answer to a purge: `{"purged": true, "affected": [mxc…]}`, with our counts.
fn purged(result: Purged) -> Response {
    match result {
        Purged::Done(report) => Json(json!({
            "purged": true,
            "affected": report.affected,
            "total": report.media,
            "thumbnails": report.thumbnails,
            "objects_deleted": report.objects,
        }))
        .into_response(),
        Purged::Running(id) => still_running(id),
    }
}

fn still_running(task_id: i64) -> Response {
    (
        StatusCode::ACCEPTED,
        Json(json!({ "purged": false, "task_id": task_id })),
    )
        .into_response()
}

/// `POST purge/remote?before_ts=` and `purge_remote`: cached remote media.
async fn purge_remote(
    State(state): State<SharedState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    caller.require_repo_admin()?;
    let before_ts = before_ts(q.as_deref())?;
    purge_cache(&state, Selection::Remote { before_ts }, "num_removed").await
}

/// Cached remote media (`selection`), answered with how many as `count_name`.
async fn purge_cache(
    state: &SharedState,
    selection: Selection,
    count_name: &str,
) -> ApiResult<Response> {
    Ok(match purge(state, selection, None).await? {
        Purged::Done(report) => {
            let mut answer = serde_json::Map::new();
            answer.insert(count_name.to_owned(), json!(report.media));
            Json(answer).into_response()
        }
        Purged::Running(id) => still_running(id),
    })
}

/// Synapse's `POST /_matrix/client/{version}/admin/purge_media_cache?before_ts=`: remote media
/// last served before then.
async fn purge_media_cache(
    State(state): State<SharedState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    caller.require_repo_admin()?;
    let before_ts = query_param(q.as_deref(), "before_ts")
        .ok_or_else(|| ApiError::bad_request("Missing integer query parameter 'before_ts'"))?
        .parse()
        .map_err(|_| ApiError::bad_request("`before_ts` must be a time in milliseconds"))?;
    // Synapse's meaning: remote media not accessed since then.
    let selection = Selection::Old {
        before_ts,
        include_local: false,
    };
    purge_cache(&state, selection, "deleted").await
}

/// `POST purge/old?before_ts=&include_local=`
async fn purge_old(
    State(state): State<SharedState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    caller.require_repo_admin()?;
    let selection = Selection::Old {
        before_ts: before_ts(q.as_deref())?,
        include_local: query_param(q.as_deref(), "include_local").is_some_and(|v| v == "true"),
    };
    Ok(purged(purge(&state, selection, None).await?))
}

/// `POST purge/quarantined`: a homeserver admin purges their own server's only.
async fn purge_quarantined(
    State(state): State<SharedState>,
    caller: Caller,
) -> ApiResult<Response> {
    let scope = caller.scope(&state, true).await?;
    Ok(purged(purge(&state, Selection::Quarantined, scope).await?))
}

/// `POST purge/user/{userId}?before_ts=`
async fn purge_user(
    State(state): State<SharedState>,
    caller: Caller,
    Path(user_id): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    valid_user(&user_id)?;
    let scope = caller
        .scope_for(&state, true, server_of(&user_id).unwrap_or_default())
        .await?;
    let selection = Selection::User {
        user_id,
        before_ts: before_ts(q.as_deref())?,
    };
    Ok(purged(purge(&state, selection, scope).await?))
}

/// `POST purge/server/{serverName}?before_ts=`
async fn purge_server(
    State(state): State<SharedState>,
    caller: Caller,
    Path(server): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    valid_server(&server)?;
    let scope = caller.scope_for(&state, true, &server).await?;
    let selection = Selection::Server {
        origin: server,
        before_ts: before_ts(q.as_deref())?,
    };
    Ok(purged(purge(&state, selection, scope).await?))
}

/// `POST purge/room/{roomId}?before_ts=`: the room's media as the homeserver lists it, stored
/// before `before_ts`.
async fn purge_room(
    State(state): State<SharedState>,
    caller: Caller,
    Path(room_id): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let scope = caller.scope(&state, true).await?;
    let before = before_ts(q.as_deref())?;
    let mut media = room_media(&state, &caller, &room_id).await?;
    if let Some(own) = &scope {
        media.retain(|(origin, _)| origin.eq_ignore_ascii_case(own));
    }
    let mut old = Vec::with_capacity(media.len());
    for (origin, media_id) in media {
        if let Some(m) = state.media.store().media(&origin, &media_id).await?
            && m.created_ts < before
        {
            old.push((origin, media_id));
        }
    }
    Ok(purged(
        purge(&state, Selection::Media { media: old }, scope).await?,
    ))
}

/// `POST purge/{server}/{mediaId}`: admins, and the uploader.
async fn purge_one(
    State(state): State<SharedState>,
    caller: Caller,
    Path((server, media_id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let Some(media) = state.media.store().media(&server, &media_id).await? else {
        return Err(ApiError::not_found("No such media"));
    };
    let uploader = !media.user_id.is_empty() && media.user_id == caller.user.user_id;
    let scope = if uploader {
        None
    } else {
        caller.scope_for(&state, true, &server).await?
    };
    let selection = Selection::Media {
        media: vec![(server, media_id)],
    };
    Ok(purged(purge(&state, selection, scope).await?))
}

/// The media of a room, as `(origin, media_id)`, from the homeserver's admin API (Synapse's
/// `/_synapse/admin/v1/room/{roomId}/media`, with the caller's token).
async fn room_media(
    state: &SharedState,
    caller: &Caller,
    room_id: &str,
) -> ApiResult<Vec<(String, String)>> {
    if !room_id.starts_with('!') || room_id.len() > 255 {
        return Err(ApiError::bad_request(format!(
            "`{room_id}` is not a room id (!opaque:server)"
        )));
    }
    let ctx = &caller.ctx;
    if ctx.hs.admin_api_kind != AdminApiKind::Synapse {
        return Err(ApiError::bad_request(format!(
            "A room's media can only be listed through Synapse's admin API, and {}'s \
             adminApiKind is not `synapse`",
            ctx.hs.name
        )));
    }
    let path = format!(
        "/_synapse/admin/v1/room/{}/media",
        percent_encoding::utf8_percent_encode(room_id, percent_encoding::NON_ALPHANUMERIC)
    );
    let response = state
        .auth
        .homeserver(&ctx.config, &ctx.hs, outbound::Method::GET, &path, |r| {
            r.bearer_auth(&caller.token)
        })
        .await
        .map_err(|e| room_failed(ctx, &e.to_string()))?;
    let status = response.status();
    if status == StatusCode::FORBIDDEN {
        // The listing is asked with the caller's own token, as matrix-media-repo does.
        return Err(ApiError::forbidden(format!(
            "A room's media are listed through {}'s admin API with your token, and it refused: \
             room purges and quarantines need an administrator of that homeserver",
            ctx.hs.name
        )));
    }
    if !status.is_success() {
        return Err(room_failed(ctx, &format!("HTTP {status}")));
    }
    let body: Value = response
        .json()
        .await
        .map_err(|e| room_failed(ctx, &e.to_string()))?;
    let mut media = Vec::new();
    for list in ["local", "remote"] {
        for mxc in body[list].as_array().into_iter().flatten() {
            if let Some((origin, id)) = mxc
                .as_str()
                .and_then(|m| m.strip_prefix("mxc://"))
                .and_then(|m| m.split_once('/'))
            {
                media.push((origin.to_owned(), id.to_owned()));
            }
        }
    }
    Ok(media)
}

fn room_failed(ctx: &Ctx, why: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "M_UNKNOWN",
        format!(
            "The homeserver {} did not list the room's media: {why}",
            ctx.hs.name
        ),
    )
}

/// Quarantines `selection` within `scope`; answers `{"num_quarantined": n}`.
async fn quarantine(
    state: &SharedState,
    selection: Selection,
    scope: Option<String>,
) -> ApiResult<Json<Value>> {
    let n = state
        .media
        .store()
        .quarantine(&selection, scope.as_deref())
        .await?;
    Ok(Json(json!({ "num_quarantined": n })))
}

/// `POST quarantine/room/{roomId}` and Synapse's `quarantine_media/{roomId}`.
async fn quarantine_room(
    State(state): State<SharedState>,
    caller: Caller,
    // By name: Synapse's path also has a `{version}`.
    Path(params): Path<std::collections::HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let room_id = params.get("room_id").cloned().unwrap_or_default();
    let scope = caller.scope(&state, caller.quarantine_locals()).await?;
    let media = room_media(&state, &caller, &room_id).await?;
    quarantine(&state, Selection::Media { media }, scope).await
}

/// `POST quarantine/user/{userId}`
async fn quarantine_user(
    State(state): State<SharedState>,
    caller: Caller,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Value>> {
    valid_user(&user_id)?;
    let scope = caller
        .scope_for(
            &state,
            caller.quarantine_locals(),
            server_of(&user_id).unwrap_or_default(),
        )
        .await?;
    let selection = Selection::User {
        user_id,
        before_ts: i64::MAX,
    };
    quarantine(&state, selection, scope).await
}

/// `POST quarantine/server/{serverName}`: what is stored now (later media is not flagged).
async fn quarantine_server(
    State(state): State<SharedState>,
    caller: Caller,
    Path(server): Path<String>,
) -> ApiResult<Json<Value>> {
    valid_server(&server)?;
    let scope = caller
        .scope_for(&state, caller.quarantine_locals(), &server)
        .await?;
    let selection = Selection::Server {
        origin: server,
        before_ts: i64::MAX,
    };
    quarantine(&state, selection, scope).await
}

/// `POST quarantine/{server}/{mediaId}`: the media and every media with the same content.
async fn quarantine_one(
    State(state): State<SharedState>,
    caller: Caller,
    Path((server, media_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let scope = caller
        .scope_for(&state, caller.quarantine_locals(), &server)
        .await?;
    let store = state.media.store();
    match store.media_purpose(&server, &media_id).await? {
        None => return Err(ApiError::not_found("No such media")),
        Some(p) if p == "pinned" => {
            return Err(ApiError::forbidden(
                "This media is pinned: it cannot be quarantined",
            ));
        }
        Some(_) => {}
    }
    let selection = Selection::Media {
        media: vec![(server, media_id)],
    };
    quarantine(&state, selection, scope).await
}

/// `POST unquarantine/{server}/{mediaId}` (ours): the content is served and accepted again.
async fn unquarantine_one(
    State(state): State<SharedState>,
    caller: Caller,
    Path((server, media_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller
        .scope_for(&state, caller.quarantine_locals(), &server)
        .await?;
    match state.media.store().unquarantine(&server, &media_id).await? {
        Some(n) => Ok(Json(json!({ "num_unquarantined": n }))),
        None => Err(ApiError::not_found("No such media")),
    }
}

/// `GET datastores`: `{id: {type, uri}}`.
async fn datastores(caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_repo_admin()?;
    let mut all = serde_json::Map::new();
    for ds in &caller.ctx.config.datastores {
        let (kind, uri) = match &ds.opts {
            config::DatastoreOpts::File(f) => ("file", f.path.clone()),
            config::DatastoreOpts::S3(s) => {
                ("s3", format!("s3://{}/{}", s.endpoint, s.bucket_name))
            }
        };
        all.insert(ds.id.clone(), json!({ "type": kind, "uri": uri }));
    }
    Ok(Json(Value::Object(all)))
}

fn known_datastore(state: &SharedState, id: &str) -> ApiResult<()> {
    match state.media.store().datastores().get(id) {
        Some(_) => Ok(()),
        None => Err(ApiError::not_found(format!("No datastore `{id}`"))),
    }
}

/// `GET datastores/{id}/size_estimate`
async fn size_estimate(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<store::admin::SizeEstimate>> {
    caller.require_repo_admin()?;
    known_datastore(&state, &id)?;
    Ok(Json(state.media.store().size_estimate(&id).await?))
}

/// `POST datastores/{from}/transfer_to/{to}`: a `storage_migration` task; answered with what it
/// moves and the task's id.
async fn transfer_to(
    State(state): State<SharedState>,
    caller: Caller,
    Path((from, to)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Value>> {
    caller.require_repo_admin()?;
    known_datastore(&state, &from)?;
    known_datastore(&state, &to)?;
    if from == to {
        return Err(ApiError::bad_request(
            "The source and target datastores are the same",
        ));
    }
    let estimate = state.media.store().size_estimate(&from).await?;
    let task_id = state
        .media
        .start_task(&Task::StorageMigration {
            source_datastore_id: from,
            target_datastore_id: to,
            before_ts: before_ts(q.as_deref())?,
        })
        .await?;
    let mut answer = serde_json::to_value(estimate).unwrap_or_default();
    answer["task_id"] = json!(task_id);
    Ok(Json(answer))
}

/// `GET federation/test/{serverName}`: where the server is reached, and its `/version`.
async fn federation_test(
    State(state): State<SharedState>,
    caller: Caller,
    Path(server): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_repo_admin()?;
    let timeout = Duration::from_secs(u64::from(
        caller.ctx.config.timeouts.federation_timeout_seconds.max(1),
    ));
    let result = state
        .federation
        .get(
            &server,
            "/_matrix/federation/v1/version",
            None,
            outbound::Purpose::homeserver(timeout),
        )
        .await;
    Ok(Json(match result {
        Ok((dest, response)) => {
            let status = response.status();
            let version: Value = response.json().await.unwrap_or(Value::Null);
            json!({
                "can_reach": status.is_success(),
                "hostname": dest.host_header,
                "resolved_url": dest.base_url,
                "versions_response": version,
                "error_message": if status.is_success() { String::new() } else { format!("HTTP {status}") },
            })
        }
        Err(e) => json!({
            "can_reach": false,
            "error_message": e.to_string(),
        }),
    }))
}

/// `GET usage/{serverName}`
async fn usage_server(
    State(state): State<SharedState>,
    caller: Caller,
    Path(server): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_repo_admin()?;
    let (media, thumbs) = state.media.store().server_usage(&server).await?;
    Ok(Json(json!({
        "raw_bytes": { "total": media.bytes + thumbs.bytes, "media": media.bytes, "thumbnails": thumbs.bytes },
        "raw_counts": { "total": media.count + thumbs.count, "media": media.count, "thumbnails": thumbs.count },
    })))
}

/// `GET usage/{serverName}/users[?user_id=…]`
async fn usage_users(
    State(state): State<SharedState>,
    caller: Caller,
    Path(server): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Value>> {
    caller.require_repo_admin()?;
    let users = query_all(q.as_deref(), "user_id");
    let usage = state
        .media
        .store()
        .users_usage(&server, (!users.is_empty()).then_some(users.as_slice()))
        .await?;
    let mut all = serde_json::Map::new();
    for (user, u) in usage {
        all.insert(
            user,
            json!({
                "raw_bytes": { "total": u.media.bytes, "media": u.media.bytes },
                "raw_counts": { "total": u.media.count, "media": u.media.count },
                "uploaded": u.uploaded,
            }),
        );
    }
    Ok(Json(Value::Object(all)))
}

/// `GET usage/{serverName}/users-stats`, Synapse's users' media statistics: repo admins, and the
/// admins of that homeserver.
async fn users_stats(
    State(state): State<SharedState>,
    caller: Caller,
    Path(server): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Value>> {
    caller.scope_for(&state, true, &server).await?;
    let q = q.as_deref();
    let number = |name: &str, default: u64| -> ApiResult<u64> {
        query_param(q, name).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("`{name}` must be a number")))
        })
    };
    let time = |name: &str| -> ApiResult<Option<i64>> {
        query_param(q, name)
            .map(|v| {
                v.parse()
                    .map_err(|_| ApiError::bad_request(format!("`{name}` must be a time in ms")))
            })
            .transpose()
    };
    let query = StatsQuery {
        from: number("from", 0)?,
        limit: number("limit", 100)?,
        order_by: query_param(q, "order_by").unwrap_or_default(),
        backwards: query_param(q, "dir").is_some_and(|d| d == "b"),
        from_ts: time("from_ts")?,
        until_ts: time("until_ts")?,
        search_term: query_param(q, "search_term"),
    };
    let (users, total) = state.media.store().users_stats(&server, &query).await?;
    let mut answer = json!({ "users": users, "total": total });
    let next = query.from + users.len() as u64;
    if next < total {
        answer["next_token"] = json!(next);
    }
    Ok(Json(answer))
}

/// `GET usage/{serverName}/uploads[?mxc=…]`
async fn usage_uploads(
    State(state): State<SharedState>,
    caller: Caller,
    Path(server): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Value>> {
    caller.require_repo_admin()?;
    let prefix = format!("mxc://{server}/");
    let mut ids = Vec::new();
    for mxc in query_all(q.as_deref(), "mxc") {
        match mxc.strip_prefix(&prefix) {
            Some(id) => ids.push(id.to_owned()),
            None => {
                return Err(ApiError::bad_request(format!(
                    "`{mxc}` is not an mxc URI of {server}"
                )));
            }
        }
    }
    let uploads = state
        .media
        .store()
        .uploads(&server, (!ids.is_empty()).then_some(ids.as_slice()))
        .await?;
    Ok(Json(serde_json::to_value(uploads).unwrap_or_default()))
}

/// A task as MMR's tasks endpoints show it, with what it did so far.
fn task_json(t: &store::TaskRow) -> Value {
    json!({
        "task_id": t.id,
        "task_name": t.name,
        "params": serde_json::from_str::<Value>(&t.params).unwrap_or(Value::Null),
        "start_ts": t.start_ts,
        "end_ts": t.end_ts,
        "is_finished": t.end_ts != 0,
        "error_message": t.error,
        "progress": serde_json::from_str::<Value>(&t.progress).unwrap_or(Value::Null),
    })
}

async fn tasks_all(State(state): State<SharedState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_repo_admin()?;
    let tasks = state.media.store().tasks(false).await?;
    Ok(Json(Value::Array(tasks.iter().map(task_json).collect())))
}

async fn tasks_unfinished(
    State(state): State<SharedState>,
    caller: Caller,
) -> ApiResult<Json<Value>> {
    caller.require_repo_admin()?;
    let tasks = state.media.store().tasks(true).await?;
    Ok(Json(Value::Array(tasks.iter().map(task_json).collect())))
}

async fn task_one(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_repo_admin()?;
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::bad_request("A task id is a number"))?;
    match state.media.store().task(id).await? {
        Some(t) => Ok(Json(task_json(&t))),
        None => Err(ApiError::not_found(format!("No task {id}"))),
    }
}

/// `GET media/{server}/{mediaId}/attributes`: repo admins, and that homeserver's admins.
async fn attributes(
    State(state): State<SharedState>,
    caller: Caller,
    Path((server, media_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.scope_for(&state, true, &server).await?;
    match state
        .media
        .store()
        .media_purpose(&server, &media_id)
        .await?
    {
        Some(purpose) => Ok(Json(json!({ "purpose": purpose }))),
        None => Err(ApiError::not_found("No such media")),
    }
}

/// `POST media/{server}/{mediaId}/attributes[/set]` with `{"purpose": "none" | "pinned"}`.
async fn set_attributes(
    State(state): State<SharedState>,
    caller: Caller,
    Path((server, media_id)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    caller.scope_for(&state, true, &server).await?;
    let body: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "M_BAD_JSON",
            format!("The body is not JSON: {e}"),
        )
    })?;
    let purpose = body["purpose"].as_str().unwrap_or_default();
    if !store::admin::PURPOSES.contains(&purpose) {
        return Err(ApiError::bad_request(format!(
            "`purpose` must be one of {}",
            store::admin::PURPOSES.join(", ")
        )));
    }
    if !state
        .media
        .store()
        .set_media_purpose(&server, &media_id, purpose)
        .await?
    {
        return Err(ApiError::not_found("No such media"));
    }
    Ok(Json(json!({ "purpose": purpose })))
}

/// Starts an `export_data` task for `entity`; answers `{export_id, task_id}`.
async fn start_export(
    state: &SharedState,
    caller: &Caller,
    entity: &str,
    query: Option<&str>,
) -> ApiResult<Json<Value>> {
    let config = &caller.ctx.config;
    if !config.archiving.enabled {
        return Err(ApiError::forbidden(
            "Exports are disabled on this media repository (archiving.enabled)",
        ));
    }
    if state
        .media
        .store()
        .datastores()
        .for_kind(config::MediaKind::Archives)
        .is_none()
    {
        return Err(ApiError::internal(
            "No datastore takes archives: add `archives` to a datastore's forKinds",
        ));
    }
    let store = state.media.store();
    let export_id = store.create_export(entity).await?;
    let task_id = state
        .media
        .start_task(&Task::ExportData {
            export_id: export_id.clone(),
            entity: entity.to_owned(),
            include_s3_urls: query_param(query, "s3_urls").is_none_or(|v| v != "false"),
            part_bytes: config.archiving.target_bytes_per_part.max(1),
        })
        .await?;
    Ok(Json(json!({ "export_id": export_id, "task_id": task_id })))
}

/// `POST user/{userId}/export`: repo admins, the user's homeserver's admins, and the user
/// themselves with `archiving.selfService`.
async fn export_user(
    State(state): State<SharedState>,
    caller: Caller,
    Path(user_id): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Value>> {
    valid_user(&user_id)?;
    let own = caller.user.user_id == user_id && caller.ctx.config.archiving.self_service;
    if !own {
        caller
            .scope_for(&state, true, server_of(&user_id).unwrap_or_default())
            .await?;
    }
    start_export(&state, &caller, &user_id, q.as_deref()).await
}

/// `POST server/{serverName}/export`: repo admins, and that homeserver's admins.
async fn export_server(
    State(state): State<SharedState>,
    caller: Caller,
    Path(server): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Value>> {
    valid_server(&server)?;
    caller.scope_for(&state, true, &server).await?;
    start_export(&state, &caller, &server, q.as_deref()).await
}

/// The export the (secret) id names.
async fn export_named(state: &SharedState, export_id: &str) -> ApiResult<store::archives::Export> {
    state
        .media
        .store()
        .export(export_id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such export"))
}

/// `GET export/{exportId}/metadata`: `{entity, parts: [{index, size, name}]}`.
async fn export_metadata(
    State(state): State<SharedState>,
    Path(export_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let export = export_named(&state, &export_id).await?;
    let parts: Vec<Value> = export
        .parts
        .iter()
        .map(|p| json!({ "index": p.index, "size": p.object.size, "name": p.file_name }))
        .collect();
    Ok(Json(json!({ "entity": export.entity, "parts": parts })))
}

/// `GET export/{exportId}/view`: a page with the parts to download, and a way to delete them.
async fn export_view(
    State(state): State<SharedState>,
    Path(export_id): Path<String>,
) -> ApiResult<Response> {
    let export = export_named(&state, &export_id).await?;
    let escape = media::archives::escape_html;
    let mut page = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Export of {0}</title></head>\
         <body><h1>Media export of {0}</h1><ul>",
        escape(&export.entity)
    );
    for p in &export.parts {
        page.push_str(&format!(
            "<li><a href=\"part/{0}\" download=\"{1}\">{1}</a> ({2} bytes)</li>",
            p.index,
            escape(&p.file_name),
            p.object.size
        ));
    }
    page.push_str(
        "</ul><p>Once you have downloaded every part: \
         <button onclick=\"fetch(location.pathname.replace(/\\/view$/, ''), {method: 'DELETE'}).then(() => location.reload())\">\
         delete this export</button></p></body></html>",
    );
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; connect-src 'self'",
            ),
        ],
        page,
    )
        .into_response())
}

/// `GET export/{exportId}/part/{partId}`
async fn export_part(
    State(state): State<SharedState>,
    Path((export_id, part)): Path<(String, String)>,
    parts: Parts,
) -> ApiResult<Response> {
    let export = export_named(&state, &export_id).await?;
    let part = export
        .parts
        .iter()
        .find(|p| p.index.to_string() == part)
        .ok_or_else(|| ApiError::not_found("No such part"))?;
    crate::client_media::serve_object(
        &state,
        &parts,
        "application/gzip",
        &part.object,
        Some(&part.file_name),
        false,
    )
    .await
}

/// `DELETE export/{exportId}`
async fn export_delete(
    State(state): State<SharedState>,
    Path(export_id): Path<String>,
) -> ApiResult<Json<Value>> {
    if state.media.store().delete_export(&export_id).await? {
        Ok(Json(json!({})))
    } else {
        Err(ApiError::not_found("No such export"))
    }
}

/// Streams a request body (an archive part) into a temp file of the archives datastore, at most
/// `max` bytes.
async fn receive_part(
    state: &SharedState,
    body: axum::body::Body,
    max: u64,
) -> ApiResult<tempfile::TempPath> {
    use futures_util::StreamExt as _;
    use tokio::io::AsyncWriteExt as _;
    let dir = state.media.store().archives_temp_dir()?;
    let failed = |e: std::io::Error| ApiError::internal(format!("cannot keep the part: {e}"));
    tokio::fs::create_dir_all(&dir).await.map_err(failed)?;
    let temp = tempfile::Builder::new()
        .prefix(store::archives::EXPORT_TEMP_PREFIX)
        .tempfile_in(&dir)
        .map_err(failed)?;
    let (file, path) = temp.into_parts();
    let mut file = tokio::fs::File::from_std(file);
    let mut stream = body.into_data_stream();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("The body broke off: {e}")))?;
        size += chunk.len() as u64;
        if size > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "M_TOO_LARGE",
                format!("An archive part may have at most {max} bytes"),
            ));
        }
        file.write_all(&chunk).await.map_err(failed)?;
    }
    file.sync_all().await.map_err(failed)?;
    Ok(path)
}

/// The largest archive part accepted: twice what exports aim at, and at least 256 MiB.
fn max_part(config: &config::Config) -> u64 {
    (config.archiving.target_bytes_per_part.saturating_mul(2)).max(256 * 1024 * 1024)
}

/// `POST import` with the first part as the body: an `import_data` task; answers
/// `{import_id, task_id}`. Repo admins only (an archive may hold any server's media).
async fn import_start(
    State(state): State<SharedState>,
    caller: Caller,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    caller.require_repo_admin()?;
    let config = &caller.ctx.config;
    let part = receive_part(&state, body, max_part(config)).await?;
    let store = state.media.store();
    let import_id = store.create_import().await?;
    store.add_import_part(&import_id, &part).await?;
    let task_id = state
        .media
        .start_task(&Task::ImportData {
            import_id: import_id.clone(),
            local_origins: config.homeservers.iter().map(|h| h.name.clone()).collect(),
        })
        .await?;
    Ok(Json(json!({ "import_id": import_id, "task_id": task_id })))
}

/// `POST import/{importId}/part` with a further part as the body.
async fn import_part(
    State(state): State<SharedState>,
    caller: Caller,
    Path(import_id): Path<String>,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    caller.require_repo_admin()?;
    let part = receive_part(&state, body, max_part(&caller.ctx.config)).await?;
    if !state
        .media
        .store()
        .add_import_part(&import_id, &part)
        .await?
    {
        return Err(ApiError::not_found("No such open import"));
    }
    state.media.wake_tasks().await;
    Ok(Json(json!({})))
}

/// `POST import/{importId}/close`: no more parts; what is there is imported, and the task ends.
async fn import_close(
    State(state): State<SharedState>,
    caller: Caller,
    Path(import_id): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_repo_admin()?;
    if !state.media.store().close_import(&import_id).await? {
        return Err(ApiError::not_found("No such import"));
    }
    state.media.wake_tasks().await;
    Ok(Json(json!({})))
}
