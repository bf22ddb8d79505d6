//! Authentication and authorization of API requests, delegated to Kubernetes as the kubelet and
//! kube-rbac-proxy do: the bearer token is checked with a TokenReview, then the user must be
//! allowed `get` on `nodes/proxy` for this node (a SubjectAccessReview), the grant the kubelet's
//! own API asks for. Decisions are cached for a short time; tokens are never logged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

/// The resource attribute a caller must be allowed (`get nodes/proxy <node>`).
pub const VERB: &str = "get";
pub const RESOURCE: &str = "nodes";
pub const SUBRESOURCE: &str = "proxy";

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

pub struct Authorizer {
    client: kube::Client,
    node: String,
    ttl: Duration,
    /// Token → decision. Memory only, and only as long as `ttl`.
    cache: Mutex<HashMap<String, (Instant, Decision)>>,
}

impl Authorizer {
    pub fn new(client: kube::Client, node: String, ttl: Duration) -> Self {
        Authorizer { client, node, ttl, cache: Mutex::default() }
    }

    fn cached(&self, token: &str) -> Option<Decision> {
        let mut cache = self.cache.lock().expect("auth cache");
        let now = Instant::now();
        cache.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
        cache.get(token).map(|(_, d)| d.clone())
    }

    /// The decision for `token`; an error when the API server cannot be asked (fail closed).
    pub async fn decide(&self, token: &str) -> Result<Decision, kube::Error> {
        if let Some(d) = self.cached(token) {
            return Ok(d);
        }
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: None },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone()).create(&PostParams::default(), &review).await?;
        let status = reviewed.status.unwrap_or_default();
        let decision = match (status.authenticated, status.user) {
            (Some(true), Some(user)) => {
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
                let answer = Api::<SubjectAccessReview>::all(self.client.clone())
                    .create(&PostParams::default(), &access)
                    .await?;
                let status = answer.status.unwrap_or_default();
                if status.allowed {
                    Decision::Allowed { user: name }
                } else {
                    Decision::Forbidden { user: name, reason: status.reason.unwrap_or_default() }
                }
            }
            _ => Decision::Unauthenticated,
        };
        self.cache.lock().expect("auth cache").insert(token.to_owned(), (Instant::now(), decision.clone()));
        Ok(decision)
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
pub async fn require(State(authorizer): State<std::sync::Arc<Authorizer>>, request: Request, next: Next) -> Response {
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
            next.run(request).await
        }
        Ok(Decision::Unauthenticated) => deny(StatusCode::UNAUTHORIZED, "the token is not valid".into()),
        Ok(Decision::Forbidden { user, reason }) => {
            tracing::info!(user = %user, path = %request.uri().path(), "API request forbidden");
            let why = if reason.is_empty() { String::new() } else { format!(": {reason}") };
            deny(
                StatusCode::FORBIDDEN,
                format!("user {user} may not {VERB} {RESOURCE}/{SUBRESOURCE} {}{why}", authorizer.node),
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot check API credentials with the Kubernetes API; refusing");
            deny(
                StatusCode::SERVICE_UNAVAILABLE,
                "credentials cannot be checked now (Kubernetes API unreachable)".into(),
            )
        }
    }
}
