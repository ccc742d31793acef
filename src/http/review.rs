//! The apiserver's word on a bearer token: TokenReview (who is it?) and
//! SubjectAccessReview on a non-resource URL (may they `get` this path?), as
//! the kubelet's webhook authn/authz asks it. The HTTP side's only use of the
//! apiserver, so it lives here rather than in `crate::kube`.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};

/// A review the apiserver did not answer.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the {review} was refused by the apiserver (does the agent's ClusterRole grant create on it?)")]
    Api {
        review: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("the apiserver did not answer the {review} within {}s", REVIEW_TIMEOUT.as_secs())]
    Timeout { review: &'static str },
}

/// Beyond this a scraper (Prometheus waits 10 s by default) has given up
/// anyway, and a slow apiserver must not pile up connections here.
pub(crate) const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Who a token belongs to, as TokenReview says (what SubjectAccessReview
/// needs back).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Asks someone whether a token is valid and whether its user may read a
/// path. The agent asks the apiserver ([`ApiserverReviewer`]); the cache's
/// tests and the bench count calls with one of their own.
pub trait Reviewer: Send + Sync {
    /// `Ok(None)`: the token is not valid (unknown, expired, wrong audience).
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Option<User>, ReviewError>>;
    /// May `user` `get` the non-resource URL `path`?
    fn authorize<'a>(
        &'a self,
        user: &'a User,
        path: &'a str,
    ) -> BoxFuture<'a, Result<bool, ReviewError>>;
}

/// Reviews through the agent's own kube client.
pub struct ApiserverReviewer {
    client: Client,
}

impl ApiserverReviewer {
    pub fn new(client: Client) -> Self {
        ApiserverReviewer { client }
    }
}

/// `create` with [`REVIEW_TIMEOUT`]; `review` names the kind in errors.
async fn create<K>(client: &Client, review: &'static str, object: &K) -> Result<K, ReviewError>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::all(client.clone());
    match tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), object)).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(source)) => Err(ReviewError::Api { review, source }),
        Err(_) => Err(ReviewError::Timeout { review }),
    }
}

impl Reviewer for ApiserverReviewer {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Option<User>, ReviewError>> {
        Box::pin(async move {
            // No audiences: the apiserver's own, as controller-runtime's
            // secure metrics ask (a projected service-account token works).
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_string()),
                    audiences: None,
                },
                ..TokenReview::default()
            };
            let answer = create(&self.client, "TokenReview", &review).await?;
            let Some(status) = answer.status else {
                return Ok(None);
            };
            if status.authenticated != Some(true) {
                return Ok(None);
            }
            let user = status.user.unwrap_or_default();
            Ok(Some(User {
                name: user.username.unwrap_or_default(),
                uid: user.uid.unwrap_or_default(),
                groups: user.groups.unwrap_or_default(),
                extra: user.extra.unwrap_or_default(),
            }))
        })
    }

    fn authorize<'a>(
        &'a self,
        user: &'a User,
        path: &'a str,
    ) -> BoxFuture<'a, Result<bool, ReviewError>> {
        Box::pin(async move {
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(user.name.clone()),
                    uid: Some(user.uid.clone()).filter(|u| !u.is_empty()),
                    groups: Some(user.groups.clone()),
                    extra: Some(user.extra.clone()).filter(|e| !e.is_empty()),
                    non_resource_attributes: Some(NonResourceAttributes {
                        path: Some(path.to_string()),
                        verb: Some("get".to_string()),
                    }),
                    resource_attributes: None,
                },
                ..SubjectAccessReview::default()
            };
            let answer = create(&self.client, "SubjectAccessReview", &review).await?;
            Ok(answer.status.is_some_and(|s| s.allowed))
        })
    }
}

type AuthnFn = dyn Fn(&str) -> Result<Option<User>, ReviewError> + Send + Sync;
type AuthzFn = dyn Fn(&User, &str) -> Result<bool, ReviewError> + Send + Sync;

/// A reviewer that answers from two functions and counts what it was asked:
/// the stand-in where no apiserver runs (the access checks' unit tests, the
/// review cache bench). The agent itself always uses [`ApiserverReviewer`].
pub struct CountingReviewer {
    authn: Box<AuthnFn>,
    authz: Box<AuthzFn>,
    /// TokenReviews asked.
    pub token_reviews: std::sync::atomic::AtomicU64,
    /// SubjectAccessReviews asked.
    pub access_reviews: std::sync::atomic::AtomicU64,
}

impl CountingReviewer {
    pub fn new(
        authn: impl Fn(&str) -> Result<Option<User>, ReviewError> + Send + Sync + 'static,
        authz: impl Fn(&User, &str) -> Result<bool, ReviewError> + Send + Sync + 'static,
    ) -> Self {
        CountingReviewer {
            authn: Box::new(authn),
            authz: Box::new(authz),
            token_reviews: Default::default(),
            access_reviews: Default::default(),
        }
    }

    pub fn token_reviews(&self) -> u64 {
        self.token_reviews
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn access_reviews(&self) -> u64 {
        self.access_reviews
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Reviewer for CountingReviewer {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Option<User>, ReviewError>> {
        self.token_reviews
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let answer = (self.authn)(token);
        Box::pin(async move { answer })
    }

    fn authorize<'a>(
        &'a self,
        user: &'a User,
        path: &'a str,
    ) -> BoxFuture<'a, Result<bool, ReviewError>> {
        self.access_reviews
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let answer = (self.authz)(user, path);
        Box::pin(async move { answer })
    }
}

impl User {
    /// A user in the group every authenticated user is in.
    pub fn named(name: &str) -> User {
        User {
            name: name.to_string(),
            uid: String::new(),
            groups: vec!["system:authenticated".to_string()],
            extra: BTreeMap::new(),
        }
    }
}
