//! The exporter's transport: for OTLP/HTTP an HTTP/1.1 client, for gRPC a tonic channel over
//! h2; both through one rustls connector when the endpoint is `https://` (`tls.rs`), and both
//! adding the current headers (`headers.rs`, re-read when their files change) to every
//! export, so that secrets never pass through the OpenTelemetry SDK's own configuration.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{
    Protocol, RetryPolicy, WithExportConfig, WithHttpConfig, WithTonicConfig,
};

use super::headers::Headers;
use super::{OtlpCfg, OtlpProtocol};

/// The SDK's hyper client, plus our headers on every request.
#[derive(Debug)]
struct HeaderClient {
    inner: HyperClient<HttpsConnector<HttpConnector>>,
    headers: Arc<Headers>,
}

#[async_trait::async_trait]
impl HttpClient for HeaderClient {
    async fn send_bytes(&self, mut req: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        for (k, v) in self.headers.current().iter() {
            req.headers_mut().insert(k.clone(), v.clone());
        }
        self.inner.send_bytes(req).await
    }
}

/// Builds the exporter for `cfg` (without its resource). Needs a tokio runtime entered.
pub fn build(cfg: &OtlpCfg, headers: Arc<Headers>) -> Result<opentelemetry_otlp::SpanExporter> {
    let endpoint = cfg.endpoint_uri()?;
    let https = endpoint.starts_with("https://");
    let tls = cfg.tls.clone().unwrap_or_default();
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let retry = RetryPolicy::default()
        .with_max_retries(cfg.max_retries)
        .with_initial_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_max_jitter(Duration::from_millis(50));
    let builder = opentelemetry_otlp::SpanExporter::builder();
    match cfg.protocol {
        OtlpProtocol::Http => {
            let client = HeaderClient {
                inner: HyperClient::new(tls.connector(false, https)?, timeout, None),
                headers,
            };
            builder
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(endpoint)
                .with_timeout(timeout)
                .with_retry_policy(retry)
                .with_http_client(client)
                .build()
        }
        OtlpProtocol::Grpc => {
            let add_headers = move |mut req: tonic::Request<()>| {
                let cur = headers.current();
                let mut h = std::mem::take(req.metadata_mut()).into_headers();
                for (k, v) in cur.iter() {
                    h.insert(k.clone(), v.clone());
                }
                *req.metadata_mut() = tonic::metadata::MetadataMap::from_headers(h);
                Ok(req)
            };
            let b = builder
                .with_tonic()
                .with_timeout(timeout)
                .with_retry_policy(retry)
                .with_interceptor(add_headers);
            if https {
                // tonic is built without its own TLS: the URI's scheme stays https (the
                // request's :scheme) and the connector does the handshake.
                let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
                    .with_context(|| format!("otlp.endpoint {:?}", super::shown_url(&endpoint)))?
                    .timeout(timeout)
                    .connect_with_connector_lazy(tls.connector(true, true)?);
                b.with_channel(channel).build()
            } else {
                b.with_endpoint(endpoint).build()
            }
        }
    }
    .context("building the OTLP exporter")
}
