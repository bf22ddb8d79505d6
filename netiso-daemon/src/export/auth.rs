//! Authentication and authorization of API requests, delegated to Kubernetes as the kubelet and
//! kube-rbac-proxy do: the bearer token is checked with a TokenReview, then the user must be
//! allowed `get` on `nodes/proxy` for this node (a SubjectAccessReview), the grant the kubelet's
//! own API asks for. Decisions are cached for a short time; tokens are never logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

use crate::evidence::record::{StreamNotice, ndjson_line};
use tokio::sync::Semaphore;

/// How query API callers are authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ApiAuth {
    /// Every caller is trusted (only sensible on loopback).
    None,
    /// Bearer tokens checked with TokenReview; `get nodes/proxy` on this node required
    /// (SubjectAccessReview).
    Kubernetes,
}

/// The resource attribute a caller must be allowed (`get nodes/proxy <node>`).
pub const VERB: &str = "get";
pub const RESOURCE: &str = "nodes";
pub const SUBRESOURCE: &str = "proxy";

/// Longest wait for the API server's answer to both reviews: a caller is answered 503 within
/// seconds, never held as long as the API server holds us.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// Reviews in flight at once, and the longest wait for a turn. Callers with distinct unknown
/// tokens cannot multiply the API server's load: beyond these they are refused with 503 (a
/// healthy API server answers in milliseconds, so a turn comes well within the wait).
const MAX_REVIEWS: usize = 8;
const TURN_WAIT: Duration = Duration::from_secs(1);
/// Decisions kept at most; beyond it new ones are not cached (they are still made).
const MAX_CACHED: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed {
        user: String,
    },
    /// The token is not valid.
    Unauthenticated,
    Forbidden {
        user: String,
        reason: String,
    },
}

/// The API server could not be asked, or did not answer in time.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReviewError(String);

type Key = [u8; 32];
type Review = Shared<BoxFuture<'static, Result<Decision, ReviewError>>>;

pub struct Authorizer {
    client: kube::Client,
    node: String,
    ttl: Duration,
    /// Token digest → decision, allowed or not. Memory only, and only as long as `ttl`.
    cache: Mutex<HashMap<Key, (Instant, Decision)>>,
    /// Reviews being made, so that identical concurrent requests share one.
    in_flight: Mutex<HashMap<Key, Review>>,
    turns: Arc<Semaphore>,
}

/// Tokens are kept only as digests, so a memory dump holds no usable credential.
fn key(token: &str) -> Key {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

impl Authorizer {
    pub fn new(client: kube::Client, node: String, ttl: Duration) -> Self {
        Authorizer {
            client,
            node,
            ttl,
            cache: Mutex::default(),
            in_flight: Mutex::default(),
            turns: Arc::new(Semaphore::new(MAX_REVIEWS)),
        }
    }

    /// How often open streams are re-checked.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn cached(&self, key: &Key) -> Option<Decision> {
        let mut cache = self.cache.lock().expect("auth cache");
        let now = Instant::now();
        cache.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
        cache.get(key).map(|(_, d)| d.clone())
    }

    /// The decision for `token`; an error when the API server cannot be asked or does not answer
    /// within `REVIEW_TIMEOUT` (fail closed).
    pub async fn decide(self: &Arc<Self>, token: &str) -> Result<Decision, ReviewError> {
        let key = key(token);
        if let Some(d) = self.cached(&key) {
            return Ok(d);
        }
        let review = {
            let mut in_flight = self.in_flight.lock().expect("auth reviews");
            in_flight
                .entry(key)
                .or_insert_with(|| {
                    // Its own task: a caller that gives up does not cancel the others' review.
                    let task = tokio::spawn(self.clone().review(key, token.to_owned()));
                    async move { task.await.unwrap_or_else(|e| Err(ReviewError(format!("review task: {e}")))) }
                        .boxed()
                        .shared()
                })
                .clone()
        };
        review.await
    }

    async fn review(self: Arc<Self>, key: Key, token: String) -> Result<Decision, ReviewError> {
        let asked = match tokio::time::timeout(TURN_WAIT, self.turns.acquire()).await {
            Ok(Ok(_turn)) => match tokio::time::timeout(REVIEW_TIMEOUT, self.ask(token)).await {
                Ok(answer) => answer.map_err(|e| ReviewError(format!("the Kubernetes API cannot be asked: {e}"))),
                Err(_) => Err(ReviewError(format!(
                    "the Kubernetes API did not answer the review within {}s",
                    REVIEW_TIMEOUT.as_secs()
                ))),
            },
            _ => Err(ReviewError(format!(
                "the Kubernetes API is slow: {MAX_REVIEWS} reviews are waiting for its answer; retry later"
            ))),
        };
        if let Ok(decision) = &asked {
            let mut cache = self.cache.lock().expect("auth cache");
            if cache.len() < MAX_CACHED {
                cache.insert(key, (Instant::now(), decision.clone()));
            }
        }
        self.in_flight.lock().expect("auth reviews").remove(&key);
        asked
    }

    /// A TokenReview, then (for a valid token) a SubjectAccessReview.
    async fn ask(&self, token: String) -> Result<Decision, kube::Error> {
        let review =
            TokenReview { spec: TokenReviewSpec { token: Some(token), audiences: None }, ..Default::default() };
        let reviewed = Api::<TokenReview>::all(self.client.clone()).create(&PostParams::default(), &review).await?;
        let status = reviewed.status.unwrap_or_default();
        let (Some(true), Some(user)) = (status.authenticated, status.user) else {
            return Ok(Decision::Unauthenticated);
        };
        let name = user.username.clone().unwrap_or_default();
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(VERB.into()),
                    resource: Some(RESOURCE.into()),
                    subresource: Some(SUBRESOURCE.into()),
                    name: Some(self.node.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer =
            Api::<SubjectAccessReview>::all(self.client.clone()).create(&PostParams::default(), &access).await?;
        let status = answer.status.unwrap_or_default();
        Ok(if status.allowed {
            Decision::Allowed { user: name }
        } else {
            Decision::Forbidden { user: name, reason: status.reason.unwrap_or_default() }
        })
    }

    fn forbidden(&self, user: &str, reason: &str) -> String {
        let why = if reason.is_empty() { String::new() } else { format!(": {reason}") };
        format!("user {user} may not {VERB} {RESOURCE}/{SUBRESOURCE} {}{why}", self.node)
    }
}

fn deny(status: StatusCode, message: String) -> Response {
    let mut response = (status, axum::Json(json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    }
    response
}

/// The middleware in front of the query API.
pub async fn require(State(authorizer): State<Arc<Authorizer>>, request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    let Some(token) = token else {
        return deny(StatusCode::UNAUTHORIZED, "a bearer token is required".into());
    };
    match authorizer.decide(&token).await {
        Ok(Decision::Allowed { user }) => {
            tracing::debug!(user = %user, path = %request.uri().path(), "API request allowed");
            let response = next.run(request).await;
            if is_stream(&response) { revocable(response, authorizer, token) } else { response }
        }
        Ok(Decision::Unauthenticated) => deny(StatusCode::UNAUTHORIZED, "the token is not valid".into()),
        Ok(Decision::Forbidden { user, reason }) => {
            tracing::info!(user = %user, path = %request.uri().path(), "API request forbidden");
            deny(StatusCode::FORBIDDEN, authorizer.forbidden(&user, &reason))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot check API credentials with the Kubernetes API; refusing");
            deny(StatusCode::SERVICE_UNAVAILABLE, format!("credentials cannot be checked now: {e}"))
        }
    }
}

fn is_stream(response: &Response) -> bool {
    response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes() == b"application/x-ndjson")
}

/// A follow stream outlives any one decision: the caller's access is checked again every TTL, and
/// the stream ends with a final line saying why once it is gone (or cannot be checked).
fn revocable(response: Response, authorizer: Arc<Authorizer>, token: String) -> Response {
    let (parts, body) = response.into_parts();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, axum::Error>>(16);
    tokio::spawn(async move {
        let mut frames = body.into_data_stream();
        let period = authorizer.ttl().max(Duration::from_secs(1));
        let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                frame = frames.next() => match frame {
                    Some(frame) => if tx.send(frame).await.is_err() { return },
                    None => return,
                },
                _ = recheck.tick() => {
                    let ended = match authorizer.decide(&token).await {
                        Ok(Decision::Allowed { .. }) => continue,
                        Ok(Decision::Unauthenticated) => "the token is no longer valid".to_owned(),
                        Ok(Decision::Forbidden { user, reason }) => authorizer.forbidden(&user, &reason),
                        Err(e) => format!("credentials cannot be checked now: {e}"),
                    };
                    tracing::info!(reason = %ended, "follow stream ended: access re-checked");
                    let notice = StreamNotice { error: format!("stream ended: {ended}"), ends: true };
                    let _ = tx.send(Ok(ndjson_line(&notice).into())).await;
                    return;
                }
            }
        }
    });
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Response::from_parts(parts, Body::from_stream(stream))
}
