//! [`BearerAuth`]: a bearer token from an async source, cached, refreshed
//! once on a `401` and the request replayed.

use std::{fmt, future::Future, sync::Arc, time::Duration};

use async_trait::async_trait;
use http::{header::AUTHORIZATION, HeaderValue};
use tokio::{sync::Mutex, time::Instant};

use super::{InterceptContext, Interceptor, ResponseAction, ResponseParts};
use crate::{preprocess::PreparedRequest, time::saturating_after};

/// A bearer token, and how long it stays good.
///
/// Its `Debug` output never shows the value.
#[derive(Clone)]
pub struct AccessToken {
    value: String,
    expires_in: Option<Duration>,
}

impl AccessToken {
    /// A token that stays good until the upstream refuses it (default: no
    /// expiry).
    pub fn new(value: impl Into<String>) -> Self {
        AccessToken {
            value: value.into(),
            expires_in: None,
        }
    }

    /// The token expires this long after it was fetched (an OAuth
    /// response's `expires_in`): fetched again on the first request after.
    #[must_use]
    pub fn expires_in(mut self, lifetime: Duration) -> Self {
        self.expires_in = Some(lifetime);
        self
    }

    /// The token itself.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("value", &"<redacted>")
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

impl From<String> for AccessToken {
    fn from(value: String) -> Self {
        AccessToken::new(value)
    }
}

impl From<&str> for AccessToken {
    fn from(value: &str) -> Self {
        AccessToken::new(value)
    }
}

/// Where [`BearerAuth`] gets its tokens: an OAuth client-credentials
/// exchange, a vault, a metadata endpoint.
///
/// An async closure `Fn() -> impl Future<Output = Result<AccessToken,
/// String>>` is one.
#[async_trait]
pub trait TokenSource: Send + Sync + 'static {
    /// Fetches a new token; an `Err` says why none could be had.
    async fn fetch(&self) -> Result<AccessToken, String>;
}

#[async_trait]
impl<F, Fut> TokenSource for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<AccessToken, String>> + Send + 'static,
{
    async fn fetch(&self) -> Result<AccessToken, String> {
        self().await
    }
}

/// The token a request was sent with, by generation: kept in the request's
/// extensions so its response knows whether the token it was refused with is
/// still the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TokenGeneration(u64);

/// The cached token.
#[derive(Default)]
struct Cache {
    /// The header value, when it expires, and its generation.
    current: Option<(HeaderValue, Option<Instant>, u64)>,
    /// The generation of the last token fetched.
    generation: u64,
}

/// Sends `authorization: Bearer <token>` with a token from a
/// [`TokenSource`], refreshes it when the upstream answers `401`, and
/// replays the request once with the new one.
///
/// * The token is fetched on the first request and cached until it expires
///   ([`AccessToken::expires_in`]) or an upstream refuses it.
/// * On a `401` to a request it authorized, the token that request carried
///   is dropped (when it is still the current one) and the request replayed
///   ([`ResponseAction::Replay`]) within the same attempt; the replay fetches
///   the next token. A `401` to the replay is the outcome: no loop.
/// * Fetches are single-flight: requests that need a token while one is
///   being fetched wait for it, so any number of tasks refused together
///   cause one refresh. A fetch runs within the attempt's timeout of the
///   request that started it; a fetch that fails refuses that request (error
///   class `InterceptorError`, the source's reason kept).
/// * A request that already has an `authorization` header keeps it, and a
///   redirect to another origin gets no token. The header is marked
///   sensitive (never logged, redacted in [`SentRequest`](super::SentRequest)).
///
/// By default every request of the processor gets the token;
/// [`only_upstream`](Self::only_upstream) limits it to one upstream.
///
/// ```
/// use patient_http::{interceptor::{AccessToken, BearerAuth}, Builder};
///
/// let auth = BearerAuth::new(|| async {
///     // e.g. a client-credentials exchange with the identity provider
///     Ok::<_, String>(AccessToken::new("t0ken").expires_in(std::time::Duration::from_secs(3600)))
/// })
/// .only_upstream("https://api.example.com");
/// let builder = Builder::new().interceptor(auth);
/// ```
pub struct BearerAuth {
    source: Arc<dyn TokenSource>,
    cache: Mutex<Cache>,
    upstream: Option<String>,
}

impl fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerAuth")
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl BearerAuth {
    /// Tokens from `source`, for every upstream.
    pub fn new(source: impl TokenSource) -> Self {
        BearerAuth {
            source: Arc::new(source),
            cache: Mutex::new(Cache::default()),
            upstream: None,
        }
    }

    /// Sends the token only to the upstream of this key (default: every
    /// upstream): its scheme, host and port as
    /// [`upstream_key`](crate::resilience::upstream_key) writes them
    /// (`https://api.example.com`), or the request's configured upstream key.
    #[must_use]
    pub fn only_upstream(mut self, key: impl Into<String>) -> Self {
        self.upstream = Some(key.into());
        self
    }

    /// The current token's header value and generation, fetching one when
    /// there is none or it expired. Holds the cache's lock while fetching:
    /// one fetch at a time.
    async fn current(&self) -> Result<(HeaderValue, u64), String> {
        let mut cache = self.cache.lock().await;
        if let Some((value, expires, generation)) = &cache.current {
            if expires.is_none_or(|at| Instant::now() < at) {
                return Ok((value.clone(), *generation));
            }
        }
        cache.current = None;
        let token = self
            .source
            .fetch()
            .await
            .map_err(|reason| format!("the token source failed: {reason}"))?;
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.value))
            .map_err(|_| "the token source returned a token that is not a valid header value")?;
        value.set_sensitive(true);
        let expires = token
            .expires_in
            .map(|lifetime| saturating_after(Instant::now(), lifetime));
        cache.generation += 1;
        let generation = cache.generation;
        cache.current = Some((value.clone(), expires, generation));
        Ok((value, generation))
    }

    fn applies_to(&self, ctx: &InterceptContext<'_>) -> bool {
        !ctx.cross_origin && self.upstream.as_deref().is_none_or(|u| u == ctx.upstream)
    }
}

#[async_trait]
impl Interceptor for BearerAuth {
    async fn on_request(
        &self,
        request: &mut PreparedRequest,
        ctx: &InterceptContext<'_>,
    ) -> Result<(), String> {
        if !self.applies_to(ctx) || request.headers().contains_key(AUTHORIZATION) {
            return Ok(());
        }
        let (value, generation) = self.current().await?;
        request.headers_mut().insert(AUTHORIZATION, value);
        request.extensions_mut().insert(TokenGeneration(generation));
        Ok(())
    }

    async fn on_response(
        &self,
        response: &mut ResponseParts,
        ctx: &InterceptContext<'_>,
    ) -> ResponseAction {
        if response.status != 401 || ctx.replay {
            return ResponseAction::Continue;
        }
        let Some(&TokenGeneration(refused)) = ctx
            .request
            .and_then(|sent| sent.extensions.get::<TokenGeneration>())
        else {
            // Not a request this interceptor authorized.
            return ResponseAction::Continue;
        };
        let mut cache = self.cache.lock().await;
        if cache
            .current
            .as_ref()
            .is_some_and(|(_, _, generation)| *generation == refused)
        {
            // Still the current token: the replay fetches the next one.
            // Otherwise another task already did, and the replay uses it.
            cache.current = None;
        }
        ResponseAction::Replay
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use bytes::Bytes;
    use http::{HeaderMap, Method};

    use super::*;
    use crate::interceptor::SentRequest;

    const CTX: InterceptContext<'static> = InterceptContext::new("t", 1, "https://api:443");

    fn request() -> PreparedRequest {
        PreparedRequest::new(
            Method::GET,
            url::Url::parse("https://api/").unwrap(),
            HeaderMap::new(),
            Bytes::new(),
        )
    }

    fn counting(fetches: &Arc<AtomicU64>) -> BearerAuth {
        let fetches = fetches.clone();
        BearerAuth::new(move || {
            let n = fetches.fetch_add(1, Ordering::SeqCst) + 1;
            async move { Ok(AccessToken::new(format!("t{n}")).expires_in(Duration::from_secs(60))) }
        })
    }

    /// Sends a request through `auth` and answers it with `status`.
    async fn exchange(auth: &BearerAuth, status: u16) -> (String, ResponseAction) {
        let mut req = request();
        auth.on_request(&mut req, &CTX).await.unwrap();
        let sent_with = req.headers()[AUTHORIZATION].to_str().unwrap().to_owned();
        let (method, url, headers, _, extensions) = req.into_parts();
        let sent = SentRequest::new(method, url, headers).with_extensions(extensions);
        let mut response = ResponseParts::new(status, HeaderMap::new());
        let action = auth
            .on_response(&mut response, &CTX.with_request(&sent))
            .await;
        (sent_with, action)
    }

    #[tokio::test(start_paused = true)]
    async fn the_token_is_cached_until_it_expires_or_is_refused() {
        let fetches = Arc::new(AtomicU64::new(0));
        let auth = counting(&fetches);
        assert_eq!(
            exchange(&auth, 200).await,
            ("Bearer t1".into(), ResponseAction::Continue)
        );
        assert_eq!(exchange(&auth, 200).await.0, "Bearer t1");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(exchange(&auth, 200).await.0, "Bearer t2");
        assert_eq!(
            exchange(&auth, 401).await,
            ("Bearer t2".into(), ResponseAction::Replay)
        );
        assert_eq!(exchange(&auth, 200).await.0, "Bearer t3");
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_refusal_of_an_older_token_keeps_the_current_one() {
        let fetches = Arc::new(AtomicU64::new(0));
        let auth = counting(&fetches);
        let mut stale = request();
        auth.on_request(&mut stale, &CTX).await.unwrap();
        assert_eq!(exchange(&auth, 401).await.1, ResponseAction::Replay);
        assert_eq!(exchange(&auth, 200).await.0, "Bearer t2");
        // The request sent with t1 is refused after t2 came: no new fetch.
        let (method, url, headers, _, extensions) = stale.into_parts();
        let sent = SentRequest::new(method, url, headers).with_extensions(extensions);
        let mut response = ResponseParts::new(401, HeaderMap::new());
        let action = auth
            .on_response(&mut response, &CTX.with_request(&sent))
            .await;
        assert_eq!(action, ResponseAction::Replay);
        assert_eq!(exchange(&auth, 200).await.0, "Bearer t2");
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn other_origins_upstreams_and_caller_headers_are_left_alone() {
        let fetches = Arc::new(AtomicU64::new(0));
        let auth = counting(&fetches).only_upstream("https://api:443");
        let mut req = request();
        auth.on_request(&mut req, &CTX.with_hop(2, true))
            .await
            .unwrap();
        let other = InterceptContext::new("t", 1, "https://other:443");
        auth.on_request(&mut req, &other).await.unwrap();
        assert!(!req.headers().contains_key(AUTHORIZATION));
        req.set_header("authorization", "Basic abc").unwrap();
        auth.on_request(&mut req, &CTX).await.unwrap();
        assert_eq!(req.headers()[AUTHORIZATION], "Basic abc");
        assert_eq!(fetches.load(Ordering::SeqCst), 0);

        // A 401 to a request it did not authorize is kept.
        let sent = SentRequest::new(
            Method::GET,
            url::Url::parse("https://api/").unwrap(),
            HeaderMap::new(),
        );
        let mut response = ResponseParts::new(401, HeaderMap::new());
        let action = auth
            .on_response(&mut response, &CTX.with_request(&sent))
            .await;
        assert_eq!(action, ResponseAction::Continue);
    }

    #[tokio::test]
    async fn a_failing_source_refuses_the_request_with_its_reason() {
        let auth = BearerAuth::new(|| async { Err::<AccessToken, _>("idp down".to_owned()) });
        let err = auth.on_request(&mut request(), &CTX).await.unwrap_err();
        assert_eq!(err, "the token source failed: idp down");
        let auth = BearerAuth::new(|| async { Ok("bad\ntoken".into()) });
        assert!(auth.on_request(&mut request(), &CTX).await.is_err());
        assert_eq!(
            format!("{:?}", AccessToken::new("s3cr3t")),
            r#"AccessToken { value: "<redacted>", expires_in: None }"#
        );
    }
}
